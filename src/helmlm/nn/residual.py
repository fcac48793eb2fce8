"""Lorentzian residual connection (LResNet)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from helmlm.geometry import as_curvature, lift_chain_rule, lorentz_normalize, promote


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
        if self.log_scale is None and self.fixed_scale is None:
            a = torch.addcmul(x, weight, y) if isinstance(weight, torch.Tensor) else x + weight * y
            return lorentz_normalize(a, self.curvature, self.eps)
        scale = self.log_scale.exp() if self.log_scale is not None else self.fixed_scale
        weight, scale = (t.to(x.dtype) if isinstance(t, torch.Tensor) else x.new_tensor(float(t))
                         for t in (weight, scale))
        c = as_curvature(self.curvature, x)
        if not torch.is_grad_enabled():  # inference and decoding: the same forward, without the Function's overhead
            return _scaled_residual(x, y, weight, scale, c, self.eps)[0]
        return _ScaledResidual.apply(x, y, weight, scale, c, self.eps)

    def extra_repr(self) -> str:
        w = "learnable" if self.weight is not None else self.fixed_weight
        s = "learnable" if self.log_scale is not None else self.fixed_scale
        return f"weight={w}, scale={s}"


def _scaled_residual(x: Tensor, y: Tensor, weight: Tensor, scale: Tensor, c: Tensor, eps: float):
    """Forward of :class:`_ScaledResidual`: the output ``z`` and the per-point ``a_t``, ``f`` and ``sign / m`` (0
    where ``m`` is clamped) that its backward needs."""
    z = torch.addcmul(x, weight, y)  # a, overwritten in place by the output below
    a_t = z[..., :1].clone()
    # <a, a>_L cancels: |a_s|^2 and a_t^2 are ~|a_s|^2 ~ 1e3-1e4 on the residual stream, their difference ~c. The
    # squares are accumulated in fp64 (as the time coordinate is), so fp32 rounding of the large terms stays out.
    acc = torch.float64 if z.dtype == torch.float32 else z.dtype
    # (vector_norm casts inside its kernel and squares in fp64: faster than `square().sum(dtype=acc)`, which
    # materialises fp32 squares and their fp64 copy, 0.16 against 0.27 ms at 8 x 256 x 260; docs/LOG.md)
    sq_space = torch.linalg.vector_norm(z[..., 1:], dim=-1, keepdim=True, dtype=acc).square()  # |a_s|^2
    inner = sq_space - a_t.to(acc).square()
    m = inner.abs().clamp_min(eps)
    factor = (scale.to(acc) * c.to(acc).sqrt() / m.sqrt()).to(z.dtype)
    z[..., 1:].mul_(factor)
    # The time from the same fp64 sum, |z_s|^2 = f^2 |a_s|^2: the fp32 rounding of z_s changes |z_s|^2 by far less
    # than the rounding of z_t itself, and a second fp64 pass over z_s is saved.
    z[..., :1] = (factor.to(acc).square() * sq_space + c.to(acc)).sqrt()
    return z, a_t, factor, (inner.sign() * (inner.abs() > eps) / m).to(z.dtype)


class _ScaledResidual(torch.autograd.Function):
    """The scaled residual ``z_s = f a_s``, ``f = scale sqrt(c) / sqrt(|<a, a>_L|)``, ``a = x + w y``, ``z_t``
    recomputed (fp64 accumulation), with a closed-form backward.

    Only the space part of the normalised point survives the rescale, so normalisation and scale fold into one
    per-point factor. Autograd's graph of the same formula takes about a dozen passes over the ``(tokens, width)``
    tensors each way and keeps ``a``; here forward is five passes and keeps only per-point scalars besides the
    output (which the next layer keeps anyway) and ``y`` (only when the weight is learned). Backward, with
    ``G = g_s + (g_t / z_t) z_s`` (the lift's chain rule) and ``m = |<a, a>_L|``:
    ``dL/da_s = f G - (f s / m) (G . a_s) a_s``, ``dL/da_t = (f s / m) (G . a_s) a_t`` with ``s = sign <a, a>_L``
    (0 where ``m`` is clamped at ``eps``), ``a_s = z_s / f``; ``dL/dx = dL/da``, ``dL/dy = w dL/da``,
    ``dL/dw = dL/da . y``, ``dL/dscale = G . z_s / scale``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, weight: Tensor, scale: Tensor, c: Tensor, eps: float) -> Tensor:
        z, a_t, factor, sign_over_m = _scaled_residual(x, y, weight, scale, c, eps)
        ctx.save_for_backward(z, y if ctx.needs_input_grad[2] else None, weight, scale, a_t, factor, sign_over_m)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, y, weight, scale, a_t, factor, sign_over_m = ctx.saved_tensors
        z_s = z[..., 1:]
        g = lift_chain_rule(grad, z)[1]  # G
        g_dot_z = torch.linalg.vecdot(g, z_s).unsqueeze(-1)  # G . z_s = f (G . a_s)
        coef = g_dot_z * sign_over_m  # f s (G . a_s) / m
        grad_a = z * (-coef / factor)  # dL/da_s = f G - coef a_s = f G - (coef / f) z_s
        grad_a[..., 1:].addcmul_(g, factor)
        grad_a[..., :1] = coef * a_t
        needs = ctx.needs_input_grad
        grad_x = grad_a if needs[0] else None
        grad_y = grad_a * weight if needs[1] else None
        grad_w = torch.linalg.vecdot(grad_a, y).unsqueeze(-1).sum_to_size(weight.shape) if needs[2] else None
        grad_scale = (g_dot_z / scale).sum().reshape(scale.shape) if needs[3] else None
        return grad_x, grad_y, grad_w, grad_scale, None, None
