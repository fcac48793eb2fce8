"""Rotary position embedding (RoPE) and its hyperbolic form HoPE.

HoPE rotates the *space part* of Lorentz queries and keys with ordinary RoPE (adjacent pairs ``(2i, 2i+1)``,
``theta_i = base^(-2i/n)``). A rotation preserves ``|x_s|``, so the time coordinate is unchanged and
``<HoPE_m(q), HoPE_n(k)>_L`` depends on positions only through ``n - m`` (MATH.md section 2). The same functions
serve the Euclidean twin, which rotates whole head vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_tables(position_ids: Tensor, rot_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``position * theta_i`` for each position, shape ``position_ids.shape + (rot_dim/2,)``.

    Angles are computed in fp64 and then cast to ``dtype``: at position ~1e4 an fp32 angle is off by ~1e-3 rad.
    Computing per call (once per model forward) keeps arbitrary positions (per-document resets, cache offsets)
    and every dtype exact, with no buffers to convert or save.
    """
    if rot_dim % 2:
        raise ValueError(f"rotary dim must be even, got {rot_dim}")
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64, device=position_ids.device) / rot_dim)
    angles = position_ids.to(torch.float64).unsqueeze(-1) * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of the last axis of ``x`` (``(B, N, H, d)``) by the angles of ``cos``/``sin``.

    ``cos``/``sin`` have shape ``(B or 1, N, d/2)``; they are broadcast over heads.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, inverse: bool = False) -> Tensor:
    """:func:`apply_rotary`'s rotation written into ``out`` (which may be a strided view, e.g. the space part of a
    Lorentz point being built; it must not overlap ``x``), or with ``inverse`` its transpose (the rotation by the
    negative angles: what a gradient goes through). ``cos``/``sin`` broadcast against ``x``'s pairs as given (the
    caller adds the head axis). Four products over half of ``x`` each, no temporaries."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    o1, o2 = out[..., 0::2], out[..., 1::2]
    if inverse:
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=-1)
    else:
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
        torch.mul(x1, sin, out=o2).addcmul_(x2, cos)
    return out
