"""RMS normalisation: hyperbolic (space part only, then lift) and its Euclidean twin."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import as_curvature, lift, lift_chain_rule, promote, sum_to_shape


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
        x = promote(x)
        weight = self.weight.to(x.dtype)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (x.requires_grad or weight.requires_grad):
            c = as_curvature(self.curvature, x)
            if c.dim() == 0:
                return _LorentzRMSNorm.apply(x, weight, c, self.eps, 0 if space_only else 1)
        # Inference, decoding and compiled graphs (inductor fuses these ops itself): the plain formula.
        space = x if space_only else x[..., 1:]
        return lift(F.rms_norm(space, (self.space_dim,), weight, self.eps), self.curvature)

    def extra_repr(self) -> str:
        return f"space_dim={self.space_dim}, eps={self.eps}"


class _LorentzRMSNorm(torch.autograd.Function):
    """``lift(rms_norm(x[..., offset:]) * w)`` in one node, reading the space part where it lies in ``x``.

    The plain graph copies the strided slice ``x[..., 1:]`` for ``rms_norm``, keeps that copy and the normalised
    space part as well as the lifted output, and in backward fills a zero gradient of ``x``'s size and copies the
    slice's gradient into it. Here forward keeps ``x`` (the residual stream, which its producer keeps anyway), the
    per-point ``r = 1 / rms`` and the output (which the next linear layer keeps); backward writes ``x``'s gradient
    once. With ``y = r x_s``, ``z_s = w y`` and ``G = g_s + (g_t / z_t) z_s`` (the lift's chain rule):
    ``dL/dx_s = r (w G - y mean(w G y))``, ``dL/dw = sum(G y)``, ``dL/dc = sum(g_t / 2 z_t)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, c: Tensor, eps: float, offset: int) -> Tensor:
        space = x[..., offset:]
        dim = space.shape[-1]
        r = (torch.linalg.vector_norm(space, dim=-1, keepdim=True).square_().div_(dim).add_(eps)).rsqrt_()
        out = x.new_empty(*x.shape[:-1], dim + 1)
        out_s = out[..., 1:]
        torch.mul(space, weight, out=out_s)
        out_s.mul_(r)
        out[..., :1] = torch.linalg.vector_norm(out_s, dim=-1, keepdim=True).square_().add_(c).sqrt_()
        ctx.save_for_backward(x, r, out, weight)
        ctx.offset, ctx.c_shape = offset, c.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, r, out, weight = ctx.saved_tensors
        offset = ctx.offset
        space = x[..., offset:]
        coef, g = lift_chain_rule(grad, out)  # G
        y = space * r
        needs = ctx.needs_input_grad
        grad_w = (g * y).flatten(0, -2).sum(0) if needs[1] else None
        grad_x = None
        if needs[0]:
            wg = g.mul_(weight)
            mean = torch.linalg.vecdot(wg, y).unsqueeze(-1).div_(space.shape[-1])
            grad_x = torch.empty_like(x)
            grad_x[..., :offset] = 0
            torch.addcmul(wg, y, mean, value=-1, out=grad_x[..., offset:])
            grad_x[..., offset:].mul_(r)
        grad_c = sum_to_shape(coef / 2, ctx.c_shape) if needs[2] else None
        return grad_x, grad_w, grad_c, None, None


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
