"""Gromov delta-hyperbolicity of a finite metric space, exact or estimated, and the null point sets to read it by.

The four-point condition: for points ``x, y, z, w`` let ``S1 >= S2 >= S3`` be the three sums
``d(x,y) + d(z,w)``, ``d(x,z) + d(y,w)``, ``d(x,w) + d(y,z)``; the space is ``delta``-hyperbolic for
``delta = max (S1 - S2) / 2`` over all quadruples (0 for a tree metric). With a base point ``p`` and the Gromov products
``(i|j)_p = (d(p,i) + d(p,j) - d(i,j)) / 2``, the quadruples that contain ``p`` give
``delta_p = max_{i,j} [ max_k min((i|k)_p, (k|j)_p) - (i|j)_p ]``, a (max, min) matrix product (Fournier, Ismail and
Vigneron 2015), and ``delta = max_p delta_p``. One base point gives only ``delta_p <= delta <= 2 delta_p``: the public
HypLoRA analysis stops there. :func:`delta_hyperbolicity` takes every base point (exact, ``O(n^4)``) or a random
sample of them (a lower bound that reaches ``delta`` when the sample is every point).
Exact, base point ``p`` only needs the points from ``p`` on, since every quadruple contains a lowest-indexed point:
about ``n^4 / 8`` (min, max) pairs in all with the symmetric product. ``relative_delta = 2 delta /
diam`` is scale-free, in [0, 1].

A small relative delta alone says little: points of a high-dimensional Gaussian have concentrated distances and
score about 0.05 (REFERENCE-HYPLORA.md section 3.4). :func:`gaussian_like` and :func:`random_rows` give the null
point sets to report beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EXACT_MAX_POINTS = 400  # above this, delta_hyperbolicity samples base points unless told otherwise


@dataclass(frozen=True)
class Delta:
    delta: float
    relative_delta: float
    diameter: float
    points: int
    base_points: int  # base points maximised over: all ``points`` when exact
    exact: bool


def pairwise_distances(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Euclidean distance matrix of the rows of ``x``, in ``dtype``."""
    x = x.to(dtype)
    return torch.cdist(x, x).fill_diagonal_(0)


def delta_of_base_point(dist: Tensor, p: int, block: int | None = None) -> Tensor:
    """``delta_p``: the largest four-point delta over the quadruples that contain point ``p`` (a 0-d tensor).

    The (max, min) product ``M = G (max, min) G`` of the Gromov products ``G`` at ``p`` is symmetric, as is ``G``, so
    only the blocks on and above the diagonal are computed. Each step takes the minimum over a ``kb x block x m``
    piece (``kb`` values of the summation index first, so the max over them is a contiguous reduction) and folds
    it into the running maximum. Measured at n = 2000, one thread: 2.1 s per base point, against 6.4 s for the
    whole square in ``block x block x n`` pieces (``python benchmarks/delta.py``)."""
    g = (dist[p][:, None] + dist[p][None, :] - dist) / 2  # Gromov products at p, symmetric
    n = g.shape[0]
    block = block or 32
    kb = max(1, 256 // block)
    best = torch.zeros((), dtype=dist.dtype, device=dist.device)
    for start in range(0, n, block):
        upper = g[:, start:]  # (n, m): (k|j) for the columns j >= start
        maxmin = torch.full((min(block, n - start), n - start), -torch.inf, dtype=g.dtype, device=g.device)
        for k in range(0, n, kb):  # max over k of min((i|k), (k|j)); g[k, i] = (i|k) by symmetry
            piece = torch.minimum(g[k:k + kb, start:start + block, None], upper[k:k + kb, None, :]).amax(dim=0)
            torch.maximum(maxmin, piece, out=maxmin)
        best = torch.maximum(best, (maxmin - g[start:start + block, start:]).amax())
    return best


def delta_hyperbolicity(dist: Tensor, exact: bool | None = None, base_points: int = 16, seed: int = 0,
                        block: int | None = None, progress=None) -> Delta:
    """The four-point delta of the metric ``dist`` (a symmetric ``(n, n)`` matrix, zero diagonal; fp64 advised).

    ``exact=True`` maximises over every base point; ``False`` over ``base_points`` random ones (a lower bound);
    ``None`` is exact up to :data:`EXACT_MAX_POINTS` points. ``progress``: an optional callable ``(done, total)``.
    """
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square matrix, got shape {tuple(dist.shape)}")
    n = dist.shape[0]
    if n < 4:
        raise ValueError(f"delta-hyperbolicity needs at least 4 points, got {n}")
    exact = n <= EXACT_MAX_POINTS if exact is None else exact
    if exact:
        chosen = list(range(n))
    else:
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(base_points, n)].tolist()
    delta = torch.zeros((), dtype=dist.dtype, device=dist.device)
    for done, p in enumerate(chosen, start=1):
        # Exact: every quadruple is seen at its lowest-indexed point, so base point p needs only the points from p on
        # (a quarter of the work over all p); a sampled base point takes every quadruple that contains it.
        piece = delta_of_base_point(dist[p:, p:], 0, block) if exact else delta_of_base_point(dist, p, block)
        delta = torch.maximum(delta, piece)
        if progress is not None:
            progress(done, len(chosen))
    diameter = float(dist.max())
    value = float(delta)
    return Delta(value, 2 * value / diameter if diameter > 0 else 0.0, diameter, n, len(chosen),
                 len(chosen) == n)


def gaussian_like(x: Tensor, n: int | None = None, seed: int = 0) -> Tensor:
    """``n`` points (default: as many as ``x`` has rows) from the Gaussian with the rows' mean and covariance: the
    null model with the same first two moments and no other structure."""
    x = x.to(torch.float64)
    n = x.shape[0] if n is None else n
    centred = x - x.mean(0)
    # Sampling through the rows themselves: mean + (random combination of centred rows) / sqrt(rows) has covariance
    # centred^T centred / rows, the (biased) sample covariance, without forming a d x d matrix.
    weights = torch.randn(n, x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.mean(0) + weights @ centred / x.shape[0] ** 0.5


def random_rows(table: Tensor, n: int, seed: int = 0, exclude: Tensor | None = None) -> Tensor:
    """``n`` distinct random rows of ``table`` (e.g. random tokens of the same embedding table), avoiding the row
    indices in ``exclude``."""
    allowed = torch.ones(table.shape[0], dtype=torch.bool)
    if exclude is not None:
        allowed[exclude] = False
    candidates = allowed.nonzero().squeeze(1)
    pick = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:n]
    return table[candidates[pick]]
