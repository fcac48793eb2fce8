"""Feed-forward blocks: the hyperbolic SwiGLU (HFFN) and the Euclidean SwiGLU twin."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import as_curvature, lift, sum_to_shape, time_from_space
from helmlm.nn.linear import UNPADDED_ROWS, LorentzLinear, aligned_linear, gemm_pad


class LorentzFeedForward(nn.Module):
    """HFFN: ``u = silu(W1 x + b1) * (W3 x + b3)`` (space only), ``lift(u)``, then LorentzLinear ``W2``.

    ``ambient`` is the ambient dim of input and output, ``hidden`` the ambient dim of the lifted hidden point
    (``hidden - 1`` space coordinates). A per-call ``curvature`` runs the whole block on another hyperboloid
    (MiCE experts).
    """

    def __init__(self, ambient: int, hidden: int, curvature: float = 1.0):
        super().__init__()
        self.ambient, self.hidden, self.curvature = ambient, hidden, curvature
        self.w1 = LorentzLinear(ambient, hidden - 1, curvature=curvature)
        self.w3 = LorentzLinear(ambient, hidden - 1, curvature=curvature)
        self.w2 = LorentzLinear(hidden, ambient - 1, curvature=curvature)

    def forward(self, x: Tensor, *, curvature=None) -> Tensor:
        c = self.curvature if curvature is None else curvature
        # Same function as `w2(lift(silu(w1 x) * w3 x))`, arranged for speed (each step is exact algebra):
        # - W1 and W3 are front-padded with zero rows to an aligned width (gemm_pad: odd widths such as 1039 are slow
        #   in BLAS); the padded columns of u are exactly 0. (One GEMM over W1 and W3 stacked was slower: the
        #   backward then stacks the two gradients into one more copy.)
        # - The lifted hidden point [t, u] is written into u's own buffer (swiglu_lift): t goes into the last zero
        #   column before u, and W2, front-padded to match, acts on it in one GEMM.
        # - Decoding (a few rows, UNPADDED_ROWS) runs unpadded, whose weight copies would cost more than the products,
        #   and so do widths without a spare column and low-precision activations (the time coordinate is kept in
        #   fp32 there): W2 acting on (t, u) is then W2[:, 1:] u + t W2[:, 0], the time entering as a rank-1 term.
        w1, b1, w3, b3 = self.w1.weight, self.w1.bias, self.w3.weight, self.w3.bias
        pad = 0 if x[..., 0].numel() <= UNPADDED_ROWS else gemm_pad(self.hidden - 1)
        if pad:
            w1, w3 = F.pad(w1, (0, 0, pad, 0)), F.pad(w3, (0, 0, pad, 0))
            b1, b3 = F.pad(b1, (pad, 0)), F.pad(b3, (pad, 0))
        g, v = F.linear(x, w1, b1), F.linear(x, w3, b3)
        if pad and g.dtype in (torch.float32, torch.float64):
            w2, b2, out_pad = F.pad(self.w2.weight, (pad - 1, 0)), self.w2.bias, gemm_pad(self.ambient - 1)
            if out_pad:  # aligned_linear's rule for the output width, inside the fused product
                w2, b2 = F.pad(w2, (0, 0, 0, out_pad)), F.pad(b2, (0, out_pad))
            out = swiglu_lift_linear(g, v, c, pad - 1, w2, b2)
            return lift(out[..., : -out_pad] if out_pad else out, c)
        u = F.silu(g) * v
        w2_space = F.pad(self.w2.weight[:, 1:], (pad, 0))
        out = aligned_linear(u, w2_space, self.w2.bias) + time_from_space(u, c) * self.w2.weight[:, 0]
        return lift(out, c)


def swiglu_lift(g: Tensor, v: Tensor, c: float | Tensor, time_col: int, ones_col: int | None = None) -> Tensor:
    """A lifted SwiGLU hidden point laid out for the next GEMM, in one buffer: ``u = silu(g) * v`` over the whole
    (padded) width, ``t = sqrt(|u|^2 + c)`` written into column ``time_col`` and, when given, 1 into ``ones_col``
    (a bias column).

    The caller gives W1 and W3 zero rows at those columns (and at any other padding), so ``g = v = 0`` and
    ``u = silu(0) 0 = 0`` there: ``|u|`` is the norm of the real hidden values, and in the backward the gradients
    of ``g`` and ``v`` are 0 there whatever arrives in those columns. With gradients recorded this is one autograd
    node (:class:`_SwiGLULift`), which keeps ``g``, ``v`` and its output (which the next GEMM keeps anyway); the
    autograd graph of the same formula would also keep ``silu(g)`` and ``u`` and copy ``u`` into a concatenation.
    Elementwise kernels run about twice as fast over an aligned width as over an odd one (docs/LOG.md).
    """
    c = as_curvature(c, g)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (g, v, c)) and not torch.compiler.is_compiling():
        return _SwiGLULift.apply(g, v, c, time_col, ones_col)
    u = F.silu(g) * v
    parts = [u[..., :time_col], time_from_space(u, c).to(u.dtype)]
    end = time_col + 1
    if ones_col is not None:  # always right after the time column in this project's layouts
        assert ones_col == end, "swiglu_lift: the ones column must follow the time column"
        parts.append(torch.ones_like(parts[-1]))
        end += 1
    return torch.cat([*parts, u[..., end:]], dim=-1)


def swiglu_lift_linear(g: Tensor, v: Tensor, c: float | Tensor, time_col: int, weight: Tensor,
                       bias: Tensor | None = None) -> Tensor:
    """``F.linear(swiglu_lift(g, v, c, time_col), weight, bias)``, keeping only ``g`` and ``v`` for the backward.

    The lifted hidden point is the widest activation of a block and the product's backward needs it only for the
    weight's gradient: the recorded path (:class:`_SwiGLULiftLinear`) rebuilds it there from ``g`` and ``v`` (one
    elementwise pass, which the backward of ``silu(g) * v`` reads anyway) instead of holding it from the forward to
    the backward: one ``(tokens, hidden)`` activation less per HFFN, and fewer temporaries in the backward.
    """
    c = as_curvature(c, g)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (g, v, c, weight, bias)) \
            and not torch.compiler.is_compiling():
        return _SwiGLULiftLinear.apply(g, v, c, time_col, weight, bias)
    return F.linear(swiglu_lift(g, v, c, time_col), weight, bias)


def _swiglu_hidden(g: Tensor, v: Tensor, c: Tensor, time_col: int, ones_col: int | None = None,
                   silu_g: Tensor | None = None) -> Tensor:
    """The forward of :func:`swiglu_lift` into a fresh buffer (``silu_g``: ``silu(g)`` when the caller has it)."""
    out = torch.mul(F.silu(g) if silu_g is None else silu_g, v)
    norm_sq = torch.linalg.vector_norm(out, dim=-1, keepdim=True).square()
    out[..., time_col: time_col + 1] = (norm_sq + c).sqrt()
    if ones_col is not None:
        out[..., ones_col] = 1
    return out


class _SwiGLULiftLinear(torch.autograd.Function):
    """:func:`swiglu_lift_linear`: the backward recomputes the hidden point ``h``, then ``grad_W = grad^T h``,
    ``grad_b = sum(grad)``, ``grad_h = grad W`` and :class:`_SwiGLULift`'s formulas, in place in three buffers."""

    @staticmethod
    def forward(ctx, g: Tensor, v: Tensor, c: Tensor, time_col: int, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(g, v, c, weight)
        ctx.time_col, ctx.has_bias = time_col, bias is not None
        return F.linear(_swiglu_hidden(g, v, c, time_col), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, v, c, weight = ctx.saved_tensors
        col = ctx.time_col
        need_g, need_v, need_c, _, need_w, need_b = ctx.needs_input_grad
        silu_g = F.silu(g)
        hidden = _swiglu_hidden(g, v, c, col, silu_g=silu_g)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_w = rows.t().mm(hidden.reshape(-1, hidden.shape[-1])) if need_w else None
        grad_b = rows.sum(0) if need_b and ctx.has_bias else None
        grad_u = grad.matmul(weight)  # the hidden point's gradient, then (in place) u's
        coef = grad_u[..., col: col + 1] / hidden[..., col: col + 1]
        grad_u.addcmul_(hidden, coef)
        grad_g = grad_v = None
        if need_g:  # silu'(g) v grad_u, written over the no longer needed hidden point
            grad_g = torch.ops.aten.silu_backward.grad_input(torch.mul(grad_u, v, out=hidden), g, grad_input=hidden)
        if need_v:
            grad_v = silu_g.mul_(grad_u)
        grad_c = sum_to_shape(coef / 2, c.shape) if need_c else None
        return grad_g, grad_v, grad_c, None, grad_w, grad_b


class _SwiGLULift(torch.autograd.Function):
    """:func:`swiglu_lift` with a closed-form backward: ``grad_u = grad + (grad_t / t) out`` (only the real columns
    of ``out`` matter: the others meet ``g = v = 0``), ``grad_g = silu'(g) v grad_u``, ``grad_v = silu(g) grad_u``,
    ``grad_c = grad_t / 2t``."""

    @staticmethod
    def forward(ctx, g: Tensor, v: Tensor, c: Tensor, time_col: int, ones_col: int | None) -> Tensor:
        out = _swiglu_hidden(g, v, c, time_col, ones_col)
        ctx.save_for_backward(g, v, out)
        ctx.time_col, ctx.c_shape = time_col, c.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, v, out = ctx.saved_tensors
        col = ctx.time_col
        coef = grad[..., col: col + 1] / out[..., col: col + 1]
        grad_u = torch.addcmul(grad, out, coef)
        grad_g = torch.ops.aten.silu_backward(grad_u * v, g) if ctx.needs_input_grad[0] else None
        grad_v = grad_u * F.silu(g) if ctx.needs_input_grad[1] else None
        grad_c = sum_to_shape(coef / 2, ctx.c_shape) if ctx.needs_input_grad[2] else None
        return grad_g, grad_v, grad_c, None, None


class SwiGLU(nn.Module):
    """LLaMA feed-forward: ``W2 (silu(W1 x) * W3 x)``, no biases; ``dim`` features in and out, ``hidden`` inside."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
