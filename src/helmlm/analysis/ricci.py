"""Ollivier-Ricci curvature of a k-nearest-neighbour graph of token embeddings (HELM's Figure 1), by exact optimal
transport (POT's ``ot.emd2``) over the graph's shortest-path metric (scipy); the ``ricci`` extra.

Edges join each point to its ``k`` nearest neighbours (symmetrised), weighted by their distance; the curvature of an
edge compares the optimal-transport distance between the two endpoints' neighbourhoods (each keeping ``alpha`` of its
mass at the centre) with the endpoints' distance: negative on tree-like, branching parts, positive in dense clusters.
The same construction on a Gaussian null of the same moments says which values come from the point cloud's shape
alone.

The numbers are those of GraphRicciCurvature 0.6.1's ``OllivierRicci(graph, weight="weight", alpha=alpha,
method="OTD")`` (which helmlm used before; tests/fixtures/ricci_graphricci_0.6.1.json holds its values):

* the measure of a node ``x``: ``alpha`` at ``x``, ``1 - alpha`` over its neighbours ``y`` in proportion to
  ``e ** -(w(x, y) ** 2)``, or evenly when those terms sum to at most ``EPSILON`` (far neighbours underflow); only the
  ``NBR_TOPK`` neighbours with the largest terms count; a node without neighbours keeps all its mass;
* the transport cost between two nodes is their shortest-path distance in the weighted graph;
* ``kappa(x, y) = 1 - W1(m_x, m_y) / d(x, y)`` with ``d`` the shortest-path distance, which is shorter than the
  edge where a path around it is; edges with ``d(x, y) < EPSILON`` get 0;
* graphs without any ``weight`` attribute count every edge as 1.0; self-loops are dropped (no value for them).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

EPSILON = 1e-7  # GraphRicciCurvature's guard: smaller weight sums spread evenly, smaller distances give curvature 0
BASE = math.e  # neighbour y of x gets mass in proportion to BASE ** -(w(x, y) ** EXP_POWER)
EXP_POWER = 2
NBR_TOPK = 3000  # only the NBR_TOPK heaviest neighbours carry mass


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


def _indexed_edges(graph, weight: str = "weight") -> tuple[list, np.ndarray, np.ndarray]:
    """The non-loop edges in ``graph.edges()`` order as node positions ``(m, 2)`` and their weights (all 1.0 when
    no edge has ``weight``)."""
    if graph.is_directed() or graph.is_multigraph():
        raise ValueError("ollivier_ricci takes an undirected simple graph (networkx.Graph)")
    position = {node: i for i, node in enumerate(graph.nodes())}
    weighted = any(w is not None for _, _, w in graph.edges(data=weight))
    pairs, weights = [], []
    for u, v, w in graph.edges(data=weight):
        if u == v:
            continue
        if weighted and w is None:
            raise ValueError(f"edge ({u!r}, {v!r}) has no {weight!r} while others do")
        pairs.append((position[u], position[v]))
        weights.append(float(w) if weighted else 1.0)
    return list(graph.nodes()), np.array(pairs, dtype=np.int64).reshape(-1, 2), np.array(weights, dtype=np.float64)


def _shortest_paths(n: int, pairs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """All-pairs shortest-path lengths (Dijkstra from each row's node; zero-length edges count as edges)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    adjacency = csr_matrix((weights, (pairs[:, 0], pairs[:, 1])), shape=(n, n))  # explicit zeros stay edges
    return dijkstra(adjacency, directed=False)


def _neighbour_measure(node: int, neighbours: np.ndarray, lengths: np.ndarray, alpha: float):
    """Support (node positions) and masses of ``node``'s measure: ``alpha`` at it, the rest over its neighbours."""
    if neighbours.size == 0:
        return np.array([node]), np.array([1.0])
    terms = BASE ** -(lengths ** EXP_POWER)
    if neighbours.size > NBR_TOPK:  # the NBR_TOPK largest (term, position) pairs
        keep = np.lexsort((neighbours, terms))[-NBR_TOPK:]
        neighbours, terms = neighbours[keep], terms[keep]
    total = terms.sum()
    if total > EPSILON:
        masses = (1.0 - alpha) * terms / total
    else:
        masses = np.full(terms.size, (1.0 - alpha) / terms.size)
    return np.append(neighbours, node), np.append(masses, alpha)


def ollivier_ricci(graph, alpha: float = 0.5) -> np.ndarray:
    """Ollivier-Ricci curvature of every edge of ``graph`` (weights as lengths), exact optimal transport; one value
    per edge in ``graph.edges()`` order (self-loops left out). Matches GraphRicciCurvature 0.6.1 (module docstring)."""
    import ot

    nodes, pairs, weights = _indexed_edges(graph)
    if pairs.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    n = len(nodes)
    distance = _shortest_paths(n, pairs, weights)
    ends = np.concatenate([pairs, pairs[:, ::-1]])
    lengths = np.concatenate([weights, weights])
    order = np.argsort(ends[:, 0], kind="stable")
    ends, lengths = ends[order], lengths[order]
    starts = np.searchsorted(ends[:, 0], np.arange(n + 1))
    measures: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def measure(x: int):
        if x not in measures:
            span = slice(starts[x], starts[x + 1])
            measures[x] = _neighbour_measure(x, ends[span, 1], lengths[span], alpha)
        return measures[x]

    curvature = np.zeros(pairs.shape[0], dtype=np.float64)
    for e, (x, y) in enumerate(pairs.tolist()):
        d = distance[x, y]
        if d < EPSILON:
            continue
        (sx, mx), (sy, my) = measure(x), measure(y)
        # the masses sum to 1 by construction and the dual potentials are not used: skip POT's checks on both
        cost = ot.emd2(mx, my, distance[np.ix_(sx, sy)], center_dual=False, check_marginals=False)
        curvature[e] = 1.0 - float(cost) / d
    return curvature


def summary(curvatures: np.ndarray) -> dict:
    return {"edges": int(curvatures.size), "mean": float(curvatures.mean()), "median": float(np.median(curvatures)),
            "share_negative": float((curvatures < 0).mean()), "q10": float(np.quantile(curvatures, 0.1)),
            "q90": float(np.quantile(curvatures, 0.9))}
