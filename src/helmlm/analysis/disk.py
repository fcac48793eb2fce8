"""Token embeddings in the Poincaré disk (issue 30): a 2-D picture of hyperbolic points that keeps each point's
distance to the origin exactly and projects only its direction.

- A Lorentz point ``x = (x_t, x_s)`` (``<x, x>_L = -c``) maps to the Poincaré ball of radius ``sqrt(c)`` by
  ``p = sqrt(c) x_s / (sqrt(c) + x_t)`` (:func:`lorentz_to_poincare`), an isometry: a point at geodesic distance
  ``r`` from the origin lands at ``|p| = sqrt(c) tanh(r / (2 sqrt(c)))``.
- A Euclidean vector ``v`` has no hyperbolic position of its own. :func:`euclidean_to_lorentz` reads ``v / scale``
  as a tangent vector at the origin of the ``c = 1`` hyperboloid and maps it by ``expmap0`` (the map the Lorentz
  nulls of :mod:`helmlm.analysis.report` use to go from the tangent space back to the manifold), so its geodesic
  radius is ``|v| / scale``. :func:`poincare_disk` takes ``scale`` = the median norm of the points it is fitted on:
  the median token lands at geodesic radius 1, where HELM's Lorentz table starts.
- To 2-D (:func:`disk_coordinates`): the radius ``|p|`` is kept exactly; the unit direction ``p / |p|`` is
  projected on a plane through the origin (:func:`direction_plane`: the top two right singular vectors of the unit
  directions, uncentred, i.e. the plane closest to them in least squares) and renormalised. In 2-D that plane is
  the identity, so angles are exact; above, they are a projection, and the share of the directions' second moment
  the plane keeps says how much of them the picture shows.

Pure functions; the plots are in :mod:`helmlm.analysis.plots` and :mod:`helmlm.analysis.interactive`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from helmlm.analysis.frequency import single_token_id
from helmlm.geometry import expmap0, project

F64 = torch.float64


def lorentz_to_poincare(x: Tensor, c: float) -> Tensor:
    """Points of the hyperboloid ``<x, x>_L = -c`` (time first) -> the Poincaré ball of radius ``sqrt(c)``:
    ``sqrt(c) x_s / (sqrt(c) + x_t)``, fp64, with the time recomputed from the space part."""
    x = project(x.detach().to(F64), c)
    sqrt_c = math.sqrt(c)
    return sqrt_c * x[..., 1:] / (sqrt_c + x[..., :1])


def euclidean_to_lorentz(v: Tensor, scale: float = 1.0) -> Tensor:
    """``v / scale`` as a tangent vector at the origin of the ``c = 1`` hyperboloid, mapped by ``expmap0``: a point
    at geodesic distance ``|v| / scale`` from the origin, in the direction of ``v``."""
    return expmap0(v.detach().to(F64) / scale, 1.0)


def direction_plane(directions: Tensor) -> tuple[Tensor, float]:
    """A ``(d, 2)`` orthonormal basis of the plane through the origin closest to the unit ``directions`` (their top
    two right singular vectors, not centred), and the share of their second moment it keeps. ``d <= 2``: the
    identity (share 1). Each axis's largest entry is made positive, so the picture does not flip between runs."""
    d = directions.shape[-1]
    if d <= 2:
        return torch.eye(d, 2, dtype=F64), 1.0
    _, s, vh = torch.linalg.svd(directions.to(F64), full_matrices=False)
    basis = vh[:2].T.clone()
    biggest = basis.abs().argmax(dim=0)
    basis *= torch.sign(basis[biggest, torch.arange(2)])
    total = float(s.square().sum())
    return basis, float(s[:2].square().sum()) / total if total > 0 else 1.0


def disk_coordinates(ball: Tensor, basis: Tensor) -> Tensor:
    """``(n, 2)`` disk points: each ball point's radius, exactly, in the direction of its unit direction projected
    on ``basis`` (a direction orthogonal to the plane, or a point at the origin, goes along the first axis)."""
    radius = ball.norm(dim=-1, keepdim=True)
    directions = ball / radius.clamp_min(torch.finfo(F64).tiny)
    flat = directions @ basis
    length = flat.norm(dim=-1, keepdim=True)
    first_axis = torch.tensor([1.0, 0.0], dtype=F64).expand_as(flat)
    unit = torch.where(length > 1e-12, flat / length.clamp_min(1e-12), first_axis)
    return radius * unit


def poincare_disk(rows: Tensor, c: float | None, fit: int | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Rows of an embedding table (Lorentz points for ``c`` given, else Euclidean vectors) -> ``(n, 2)`` points of
    the Poincaré disk of radius ``sqrt(c)`` (``c = 1`` for a Euclidean table), each point's geodesic distance to the
    origin ``(n,)``, and what was done (JSON-able). The first ``fit`` rows (default all) set the Euclidean scale
    and the plane of directions; the rest (e.g. labelled words) are mapped the same way."""
    rows = rows.detach().to(F64)
    fit = len(rows) if fit is None else fit
    if c is None:
        scale = float(rows[:fit].norm(dim=-1).median()) or 1.0
        ball, curvature = lorentz_to_poincare(euclidean_to_lorentz(rows, scale), 1.0), 1.0
        radius = rows.norm(dim=-1) / scale
        space_dim = rows.shape[-1]
    else:
        scale, curvature = None, float(c)
        ball = lorentz_to_poincare(rows, curvature)
        radius = math.sqrt(curvature) * torch.asinh(rows[:, 1:].norm(dim=-1) / math.sqrt(curvature))
        space_dim = rows.shape[-1] - 1
    fitted = ball[:fit]
    basis, share = direction_plane(fitted / fitted.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(F64).tiny))
    info = {"curvature": curvature, "disk_radius": math.sqrt(curvature), "euclidean_scale": scale,
            "direction_share": share, "map": describe_map(c, scale, share, space_dim)}
    return disk_coordinates(ball, basis), radius, info


def describe_map(c: float | None, scale: float | None, share: float, space_dim: int) -> str:
    """One sentence naming the map, for the figure's title, the report and the docs."""
    if c is None:
        first = (f"Euclidean table: v / {scale:.3g} (the median norm) as a tangent vector at the origin, expmap0 "
                 "(c = 1), then x_s / (1 + x_t)")
    else:
        first = f"Lorentz table (c = {c:g}): sqrt(c) x_s / (sqrt(c) + x_t)"
    angles = ("exact (2-D)" if space_dim <= 2 else
              f"projected on the directions' top-2 principal axes ({100 * share:.0f}% of their second moment)")
    return f"{first}; radius exact (geodesic distance to the origin), angle {angles}"


def rank_bins(n: int) -> list[tuple[int, int]]:
    """Frequency-rank bins, log-spaced for a Zipfian count: ranks 1-10, 11-30, 31-100, 101-300, 301-1000, ... up
    to ``n``."""
    edges = [0]
    while edges[-1] < n:
        k = len(edges) - 1
        edges.append(min((10, 30)[k % 2] * 10 ** (k // 2), n))
    return [(lo + 1, hi) for lo, hi in itertools.pairwise(edges)]


def disk_layout(table: Tensor, tokenizer, counts: np.ndarray, order: np.ndarray, c: float | None,
                groups: dict[str, list[str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The disk of the tokens ``order`` (ids, most frequent first) plus the single-token words of ``groups``: a
    JSON-able summary (the map, rank bins with count range and mean radius, the labelled words) and the arrays for
    the plots (points, token strings, ranks, counts, bins)."""
    rank_of = np.zeros(len(counts), dtype=np.int64)
    seen = np.flatnonzero(counts > 0)
    rank_of[seen[np.argsort(-counts[seen], kind="stable")]] = np.arange(1, seen.size + 1)
    words = [(g, w, t) for g, ws in groups.items() for w in ws if (t := single_token_id(tokenizer, w)) is not None]
    ids = np.concatenate([order, np.array([t for _, _, t in words], dtype=np.int64)])
    xy, radius, info = poincare_disk(table[torch.as_tensor(ids)], c, fit=len(order))
    xy, radius = xy.numpy(), radius.numpy()
    bins = rank_bins(len(order))
    member = np.searchsorted([hi for _, hi in bins], np.arange(1, len(order) + 1))
    info["points"] = len(order)
    info["bins"] = [{"ranks": [lo, hi], "count_min": int(counts[order[hi - 1]]),
                     "count_max": int(counts[order[lo - 1]]), "radius_mean": float(radius[lo - 1:hi].mean())}
                    for lo, hi in bins]
    info["words"] = [{"group": g, "word": w, "rank": int(rank_of[t]) or None, "count": int(counts[t]),
                      "radius": float(radius[len(order) + i])} for i, (g, w, t) in enumerate(words)]
    raw = {"xy": xy[:len(order)], "ids": order, "tokens": [tokenizer.decode([int(i)]) for i in order],
           "ranks": np.arange(1, len(order) + 1), "counts": counts[order], "bin": member,
           "radius": radius[:len(order)], "words": [dict(w, xy=xy[len(order) + i]) for i, w in
                                                    enumerate(info["words"])]}
    return info, raw
