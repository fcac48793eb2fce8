"""LorentzLinear: an affine map on the whole Lorentz vector whose output is lifted onto the hyperboloid."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift


_GEMM_ALIGN = 8


def aligned_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` whose output width is padded to a multiple of 8 for the GEMM, then sliced back.

    Lorentz layers have odd widths by construction (``space = ambient - 1``: 259, 1039, ...), and BLAS kernels
    are much slower on them: on 2 CPU cores a (8192 x 260) @ (260 x 1039) GEMM takes 66 ms, with 1040 columns
    39 ms. Padding the weight with zero rows (a copy of the weight, not of the activations) recovers that speed,
    in the backward pass too. The result is the same up to summation order.
    """
    pad = -weight.shape[0] % _GEMM_ALIGN
    if pad == 0:
        return F.linear(x, weight, bias)
    weight = F.pad(weight, (0, 0, 0, pad))
    bias = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(x, weight, bias)[..., : -pad]


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
        """Xavier-uniform with gain sqrt(2) and zero bias, as in the reference implementation."""
        nn.init.xavier_uniform_(self.weight, gain=math.sqrt(2))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, *, curvature: float | Tensor | None = None, return_space: bool = False) -> Tensor:
        space = aligned_linear(x, self.weight, self.bias)
        if return_space:
            return space
        return lift(space, self.curvature if curvature is None else curvature)

    def extra_repr(self) -> str:
        return f"in_ambient={self.in_ambient}, out_space={self.out_space}, bias={self.bias is not None}"
