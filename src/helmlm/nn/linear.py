"""LorentzLinear: an affine map on the whole Lorentz vector whose output is lifted onto the hyperboloid.

Also the two helpers every Lorentz layer shares: :func:`gemm_pad` (the one GEMM-alignment rule, used by
:func:`aligned_linear`, the HFFN and the grouped expert GEMMs) and :func:`lorentz_init_` (the one initialisation of
Lorentz weights, used by :class:`LorentzLinear` and the stacked MiCE experts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift

GEMM_ALIGN = 8  # GEMM widths are padded to a multiple of this (BLAS speed; grouped_mm's 16-byte row strides)
UNPADDED_ROWS = 16  # aligned_linear skips the padding for this many rows or fewer (decoding steps)


def gemm_pad(width: int) -> int:
    """Zero columns that bring ``width`` up to a multiple of :data:`GEMM_ALIGN` (0 when it already is one)."""
    return -width % GEMM_ALIGN


def aligned_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` whose output width is padded to a multiple of 8 for the GEMM, then sliced back.

    Lorentz layers have odd widths by construction (``space = ambient - 1``: 259, 1039, ...), and BLAS kernels
    are much slower on them (measured: docs/benchmarks.md). Padding the weight with zero rows (a copy of the
    weight, not of the activations) recovers that speed, in the backward pass too. The result is the same up to
    summation order.

    For a few rows (decoding: one token per sequence) the copy of the weight would cost as much as the product
    itself, and the matrix-vector kernels do not care about alignment: up to :data:`UNPADDED_ROWS` rows run unpadded.
    """
    pad = gemm_pad(weight.shape[0])
    if pad == 0 or x[..., 0].numel() <= UNPADDED_ROWS:
        return F.linear(x, weight, bias)
    weight = F.pad(weight, (0, 0, 0, pad))
    bias = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(x, weight, bias)[..., : -pad]


@torch.no_grad()
def lorentz_init_(weight: Tensor, gain: float = math.sqrt(2)) -> Tensor:
    """Xavier-uniform with ``gain`` (default sqrt(2), as the reference), in place, per matrix of the last two axes.

    ``weight`` is ``(out, in)`` or a stack ``(..., out, in)`` (one matrix per expert); the fans are ``in`` and
    ``out`` of each matrix, and the bound is computed exactly as ``nn.init.xavier_uniform_`` computes it.
    """
    fan_out, fan_in = weight.shape[-2:]
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    bound = math.sqrt(3.0) * std
    return weight.uniform_(-bound, bound)


class LorentzLinear(nn.Module):
    """``x (ambient_in) -> lift(W x + b)`` with ``out_space`` space coordinates (MATH.md section 2).

    The time coordinate of the input is treated as one more feature. ``forward(..., return_space=True)`` skips the
    lift, for callers that only need the space part. The curvature used by the lift defaults to the one given at
    construction and can be overridden per call (MiCE experts run on their own, learnable curvature).
    """

    def __init__(self, in_ambient: int, out_space: int, bias: bool = True, curvature: float = 1.0):
        super().__init__()
        self.in_ambient, self.out_space, self.curvature = in_ambient, out_space, curvature
        self.weight = nn.Parameter(torch.empty(out_space, in_ambient))
        self.bias = nn.Parameter(torch.empty(out_space)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """:func:`lorentz_init_` (Xavier-uniform with gain sqrt(2)) and zero bias, as in the reference."""
        lorentz_init_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, *, curvature: float | Tensor | None = None, return_space: bool = False) -> Tensor:
        space = aligned_linear(x, self.weight, self.bias)
        if return_space:
            return space
        return lift(space, self.curvature if curvature is None else curvature)

    def extra_repr(self) -> str:
        return f"in_ambient={self.in_ambient}, out_space={self.out_space}, bias={self.bias is not None}"
