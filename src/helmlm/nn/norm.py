"""RMS normalisation: hyperbolic (space part only, then lift) and its Euclidean twin."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift, promote


class LorentzRMSNorm(nn.Module):
    """Hyperbolic RMSNorm: ``s = g * x_s / sqrt(mean(x_s^2) + eps)``, then ``lift(s)``; runs in fp32 or higher.

    ``space_only=True`` means the input already is a space part (no time coordinate to drop).
    """

    def __init__(self, space_dim: int, eps: float = 1e-8, curvature: float = 1.0):
        super().__init__()
        self.space_dim, self.eps, self.curvature = space_dim, eps, curvature
        self.weight = nn.Parameter(torch.ones(space_dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, *, space_only: bool = False) -> Tensor:
        space = promote(x if space_only else x[..., 1:])
        space = F.rms_norm(space, (self.space_dim,), self.weight.to(space.dtype), self.eps)
        return lift(space, self.curvature)

    def extra_repr(self) -> str:
        return f"space_dim={self.space_dim}, eps={self.eps}"


class RMSNorm(nn.Module):
    """Euclidean RMSNorm (LLaMA), computed in fp32 or higher like its hyperbolic twin."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = promote(x)
        return F.rms_norm(x, (self.dim,), self.weight.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"
