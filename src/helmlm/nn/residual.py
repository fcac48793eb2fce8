"""Lorentzian residual connection (LResNet)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from helmlm.geometry import lift, lorentz_normalize, minkowski_inner, promote


class LorentzResidual(nn.Module):
    """``z = lorentz_normalize(x + w y)``, then optionally ``z_s <- scale * z_s`` and the time recomputed.

    This is the weighted Lorentzian centroid of ``x`` and ``y``, so it is *not* an identity skip: the optional
    ``scale`` sets the magnitude of the residual stream (HELM-D: ``4 sqrt(ambient)``, HELM-MiCE: ``sqrt(ambient)``,
    with ``ambient`` the stream's width).

    Args:
        weight: ``None`` for a learnable scalar ``w`` (init 1); a float for a fixed one. A per-call ``weight``
            passed to ``forward`` (e.g. a routing weight per token) overrides both.
        scale: ``None`` for no rescaling; otherwise the space multiplier, fixed or (``learn_scale=True``) learned
            as ``exp(log_scale)`` with ``log_scale`` initialised at ``log(scale)``.
    """

    def __init__(
        self,
        weight: float | None = None,
        scale: float | None = None,
        learn_scale: bool = False,
        curvature: float = 1.0,
        eps: float = 1e-8,
    ):
        super().__init__()
        self.curvature, self.eps = curvature, eps
        self.fixed_weight = weight
        self.weight = nn.Parameter(torch.tensor(1.0)) if weight is None else None
        if scale is not None and scale <= 0:
            raise ValueError(f"LorentzResidual scale must be positive, got {scale}")
        self.fixed_scale = None if learn_scale else scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale))) if (learn_scale and scale) else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor, y: Tensor, weight: Tensor | float | None = None) -> Tensor:
        if weight is None:
            weight = self.weight if self.weight is not None else self.fixed_weight
        x, y = promote(x), promote(y)
        a = torch.addcmul(x, weight, y) if isinstance(weight, torch.Tensor) else x + weight * y
        if self.log_scale is None and self.fixed_scale is None:
            return lorentz_normalize(a, self.curvature, self.eps)
        # Only the space part of the normalised point survives the rescale: fold normalisation and scale into one
        # per-point factor on a_s, then recompute the time.
        scale = self.log_scale.exp() if self.log_scale is not None else self.fixed_scale
        inner = minkowski_inner(a, a, keepdim=True).abs().clamp_min(self.eps)
        factor = scale * math.sqrt(self.curvature) / inner.sqrt()
        return lift(a[..., 1:] * factor, self.curvature, accurate=True)

    def extra_repr(self) -> str:
        w = "learnable" if self.weight is not None else self.fixed_weight
        s = "learnable" if self.log_scale is not None else self.fixed_scale
        return f"weight={w}, scale={s}"
