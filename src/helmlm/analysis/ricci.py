"""Ollivier-Ricci curvature of a k-nearest-neighbour graph of token embeddings (HELM's Figure 1), through the
``GraphRicciCurvature`` package (the ``ricci`` extra; install it with ``--no-deps``, OFFLINE.md).

Edges join each point to its ``k`` nearest neighbours (symmetrised), weighted by their distance; the curvature of an
edge compares the optimal-transport distance between the two endpoints' neighbourhoods (each keeping ``alpha`` of its
mass at the centre) with the edge's length: negative on tree-like, branching parts, positive in dense clusters. The
same construction on a Gaussian null of the same moments says which values come from the point cloud's shape alone.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor


def knn_graph(dist: Tensor, k: int = 10):
    """The symmetrised ``k``-nearest-neighbour graph of a distance matrix (networkx), edges weighted by distance."""
    import networkx as nx

    n = dist.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    d = dist.clone().fill_diagonal_(torch.inf)
    neighbours = d.topk(k, largest=False).indices
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        for j in neighbours[i].tolist():
            graph.add_edge(i, j, weight=float(dist[i, j]))
    return graph


def ollivier_ricci(graph, alpha: float = 0.5) -> np.ndarray:
    """Ollivier-Ricci curvature of every edge of ``graph`` (weights as lengths), exact optimal transport."""
    from GraphRicciCurvature.OllivierRicci import OllivierRicci

    logging.getLogger("GraphRicciCurvature").setLevel(logging.ERROR)
    orc = OllivierRicci(graph, weight="weight", alpha=alpha, method="OTD", proc=1, verbose="ERROR")
    orc.compute_ricci_curvature()
    return np.array([c for _, _, c in orc.G.edges(data="ricciCurvature")], dtype=np.float64)


def summary(curvatures: np.ndarray) -> dict:
    return {"edges": int(curvatures.size), "mean": float(curvatures.mean()), "median": float(np.median(curvatures)),
            "share_negative": float((curvatures < 0).mean()), "q10": float(np.quantile(curvatures, 0.1)),
            "q90": float(np.quantile(curvatures, 0.9))}
