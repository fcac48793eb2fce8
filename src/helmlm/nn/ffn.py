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
        #   column before u, and W2, front-padded to match, acts on it in one GEMM; the three products and the
        #   hidden point are one autograd node (swiglu_ffn) that keeps x, g and v only.
        # - Decoding (a few rows, UNPADDED_ROWS) runs unpadded, whose weight copies would cost more than the products,
        #   and so do widths without a spare column and low-precision activations (the time coordinate is kept in
        #   fp32 there): W2 acting on (t, u) is then W2[:, 1:] u + t W2[:, 0], the time entering as a rank-1 term.
        w1, b1, w3, b3 = self.w1.weight, self.w1.bias, self.w3.weight, self.w3.bias
        pad = 0 if x[..., 0].numel() <= UNPADDED_ROWS else gemm_pad(self.hidden - 1)
        if pad:
            w1, w3 = F.pad(w1, (0, 0, pad, 0)), F.pad(w3, (0, 0, pad, 0))
            b1, b3 = F.pad(b1, (pad, 0)), F.pad(b3, (pad, 0))
        c_tensor = as_curvature(c, x)
        if (pad and x.dtype in (torch.float32, torch.float64) and c_tensor.dim() == 0
                and not torch.is_autocast_enabled(x.device.type)):
            w2, b2, out_pad = F.pad(self.w2.weight, (pad - 1, 0)), self.w2.bias, gemm_pad(self.ambient - 1)
            if out_pad:  # aligned_linear's rule for the output width, inside the fused products
                w2, b2 = F.pad(w2, (0, 0, 0, out_pad)), F.pad(b2, (0, out_pad))
            out = swiglu_ffn(x, w1, b1, w3, b3, w2, b2, c_tensor, time_col=pad - 1)
            return lift(out[..., : -out_pad] if out_pad else out, c)
        g, v = F.linear(x, w1, b1), F.linear(x, w3, b3)
        u = F.silu(g) * v
        # Unpadded (decoding), a strided view that BLAS reads in place: F.pad would copy the weight on every step
        # (helm_d_small's compiled decoding step: 1.70 -> 1.52 ms; docs/LOG.md, 2026-12-01, fourth session).
        w2_space = F.pad(self.w2.weight[:, 1:], (pad, 0)) if pad else self.w2.weight[:, 1:]
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


def _swiglu_hidden(g: Tensor, v: Tensor, c: Tensor, time_col: int, ones_col: int | None = None,
                   silu_g: Tensor | None = None) -> Tensor:
    """The forward of :func:`swiglu_lift` into a fresh buffer (``silu_g``: ``silu(g)`` when the caller has it)."""
    out = torch.mul(F.silu(g) if silu_g is None else silu_g, v)
    norm_sq = torch.linalg.vector_norm(out, dim=-1, keepdim=True).square()
    out[..., time_col: time_col + 1] = (norm_sq + c).sqrt()
    if ones_col is not None:
        out[..., ones_col] = 1
    return out


FFN_CHUNK_ROWS = 2048  # swiglu_ffn works on blocks of this many tokens past its two first products


def swiglu_ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor, b3: Tensor | None, w2: Tensor,
               b2: Tensor | None, c: Tensor, time_col: int) -> Tensor:
    """The HFFN's three products around :func:`swiglu_lift`: ``F.linear(swiglu_lift(g, v, c, time_col), w2, b2)``
    with ``g = F.linear(x, w1, b1)``, ``v = F.linear(x, w3, b3)`` (weights already padded to the layout's widths, a
    scalar curvature ``c``).

    Past ``g`` and ``v``, the work goes in blocks of :data:`FFN_CHUNK_ROWS` tokens, so the hidden-sized
    temporaries are block-sized. With gradients recorded it is one autograd node (:class:`_SwiGLUFFN`) that keeps
    ``x``, ``g`` and ``v`` only: the backward rebuilds each block's lifted hidden point from ``g`` and ``v`` (one
    elementwise pass, which the backward of ``silu(g) * v`` needed anyway) and accumulates the weight gradients
    block by block. The forward keeps one ``(tokens, hidden)`` activation less than the graph of the same ops, and
    the backward's five hidden-sized temporaries become block-sized: the reference comparison's step (HELM-D,
    8 x 1024 tokens) keeps 33 MB less and its live tensors peak about 80 MB lower, at the same speed (docs/LOG.md,
    2026-12-01, third session).
    """
    if torch.compiler.is_compiling():
        if (x.device.type == "cpu" and torch.is_grad_enabled() and None not in (b1, b3, b2) and not c.requires_grad
                and any(t.requires_grad for t in (x, w1, b1, w3, b3, w2, b2))):  # (the op has no curvature gradient)
            # Training on CPU: this node as one opaque op, so that the compiled graph keeps x, g and v as the eager
            # node does; inductor's graph of the plain ops kept more (helm_d_small, 8 x 1,024: peak 3,037-3,287 ->
            # 2,565-3,079 MB) at the same step time (in-process A/B 0.99 / 1.00 at 256 / 1,024 tokens per row;
            # docs/LOG.md, 2026-12-01, fourth session).
            return _swiglu_ffn_op(x, w1, b1, w3, b3, w2, b2, c, time_col)[0]
        return F.linear(swiglu_lift(F.linear(x, w1, b1), F.linear(x, w3, b3), c, time_col), w2, b2)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w3, b3, w2, b2, c)):
        return _SwiGLUFFN.apply(x, w1, b1, w3, b3, w2, b2, c, time_col)
    return _swiglu_ffn_forward(x, w1, b1, w3, b3, w2, b2, c, time_col)[0]


def _blocks(rows: int) -> list[slice]:
    return [slice(r, min(r + FFN_CHUNK_ROWS, rows)) for r in range(0, rows, FFN_CHUNK_ROWS)]


def _swiglu_ffn_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor, b3: Tensor | None, w2: Tensor,
                        b2: Tensor | None, c: Tensor, time_col: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`swiglu_ffn`'s values: ``(out, g, v)`` with ``g`` and ``v`` as ``(tokens, hidden)``."""
    rows = x.reshape(-1, x.shape[-1])
    g, v = F.linear(rows, w1, b1), F.linear(rows, w3, b3)
    out = rows.new_empty(rows.shape[0], w2.shape[0])
    for r in _blocks(rows.shape[0]):
        hidden = _swiglu_hidden(g[r], v[r], c, time_col)
        if b2 is None:
            torch.mm(hidden, w2.t(), out=out[r])
        else:
            torch.addmm(b2, hidden, w2.t(), out=out[r])
    return out.view(*x.shape[:-1], w2.shape[0]), g, v


class _SwiGLUFFN(torch.autograd.Function):
    """:func:`swiglu_ffn`. Backward, per block of tokens: rebuild the hidden point ``h``; ``grad_W2 += grad^T h``;
    ``grad_h = grad W2``, then :class:`_SwiGLULift`'s formulas for ``grad_g`` and ``grad_v`` (in place, in the
    block's two buffers); ``grad_x = grad_g W1 + grad_v W3``, ``grad_W1 += grad_g^T x``, ``grad_W3 += grad_v^T x``."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w3: Tensor, b3: Tensor | None, w2: Tensor,
                b2: Tensor | None, c: Tensor, time_col: int) -> Tensor:
        out, g, v = _swiglu_ffn_forward(x, w1, b1, w3, b3, w2, b2, c, time_col)
        ctx.save_for_backward(x, g, v, c, w1, w3, w2)
        ctx.time_col, ctx.biases = time_col, (b1 is not None, b3 is not None, b2 is not None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, g, v, c, w1, w3, w2 = ctx.saved_tensors
        return (*_swiglu_ffn_backward(grad, x, g, v, c, w1, w3, w2, ctx.time_col, ctx.needs_input_grad[:8],
                                      ctx.biases), None)


def _swiglu_ffn_backward(grad: Tensor, x: Tensor, g: Tensor, v: Tensor, c: Tensor, w1: Tensor, w3: Tensor,
                         w2: Tensor, col: int, needs: tuple[bool, ...], biases: tuple[bool, bool, bool]) -> tuple:
    """:class:`_SwiGLUFFN`'s gradients ``(x, w1, b1, w3, b3, w2, b2, c)``, ``None`` where ``needs`` says so."""
    need_x, need_w1, need_b1, need_w3, need_b3, need_w2, need_b2, need_c = needs
    rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    grad_x = torch.empty_like(rows) if need_x else None
    grad_w1, grad_w3, grad_w2 = (torch.zeros_like(w) if need else None
                                 for w, need in ((w1, need_w1), (w3, need_w3), (w2, need_w2)))
    grad_b1 = g.new_zeros(g.shape[-1]) if need_b1 and biases[0] else None
    grad_b3 = v.new_zeros(v.shape[-1]) if need_b3 and biases[1] else None
    grad_c = c.new_zeros(()) if need_c else None
    for r in _blocks(rows.shape[0]):
        silu_g = F.silu(g[r])
        hidden = _swiglu_hidden(g[r], v[r], c, col, silu_g=silu_g)
        if grad_w2 is not None:
            grad_w2.addmm_(grads[r].t(), hidden)
        grad_u = grads[r].mm(w2)  # the hidden point's gradient, then (in place) u's
        coef = grad_u[:, col: col + 1] / hidden[:, col: col + 1]
        grad_u.addcmul_(hidden, coef)
        if grad_c is not None:
            grad_c += coef.sum() / 2
        # silu'(g) v grad_u, written over the hidden point; silu(g) grad_u, over silu(g)
        grad_g = torch.ops.aten.silu_backward.grad_input(torch.mul(grad_u, v[r], out=hidden), g[r],
                                                         grad_input=hidden)
        grad_v = silu_g.mul_(grad_u)
        if grad_x is not None:
            torch.mm(grad_g, w1, out=grad_x[r]).addmm_(grad_v, w3)
        for acc, block_grad in ((grad_w1, grad_g), (grad_w3, grad_v)):
            if acc is not None:
                acc.addmm_(block_grad.t(), rows[r])
        for acc, block_grad in ((grad_b1, grad_g), (grad_b3, grad_v)):
            if acc is not None:
                acc += block_grad.sum(0)
    grad_b2 = grads.sum(0) if need_b2 and biases[2] else None
    grad_x = grad_x.view(x.shape) if grad_x is not None else None
    return grad_x, grad_w1, grad_b1, grad_w3, grad_b3, grad_w2, grad_b2, grad_c


# swiglu_ffn inside torch.compile on CPU, training: the node above as a custom op, which the compiler calls as an
# opaque kernel. The forward also returns g and v, which its autograd rule keeps for the backward op.
@torch.library.custom_op("helmlm::swiglu_ffn", mutates_args=())
def _swiglu_ffn_op(x: Tensor, w1: Tensor, b1: Tensor, w3: Tensor, b3: Tensor, w2: Tensor, b2: Tensor, c: Tensor,
                   time_col: int) -> tuple[Tensor, Tensor, Tensor]:
    return _swiglu_ffn_forward(x, w1, b1, w3, b3, w2, b2, c, time_col)


@_swiglu_ffn_op.register_fake
def _(x, w1, b1, w3, b3, w2, b2, c, time_col):
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    return x.new_empty(*x.shape[:-1], w2.shape[0]), x.new_empty(rows, w1.shape[0]), x.new_empty(rows, w3.shape[0])


@torch.library.custom_op("helmlm::swiglu_ffn_backward", mutates_args=())
def _swiglu_ffn_backward_op(grad: Tensor, x: Tensor, g: Tensor, v: Tensor, c: Tensor, w1: Tensor, w3: Tensor,
                            w2: Tensor, time_col: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``x, w1, b1, w3, b3, w2, b2`` (all of them: the op's autograd rule drops the unneeded)."""
    return _swiglu_ffn_backward(grad.contiguous(), x, g, v, c, w1, w3, w2, time_col, (True,) * 7 + (False,),
                                (True, True, True))[:7]


@_swiglu_ffn_backward_op.register_fake
def _(grad, x, g, v, c, w1, w3, w2, time_col):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w3),
            w3.new_empty(w3.shape[0]), torch.empty_like(w2), w2.new_empty(w2.shape[0]))


def _swiglu_ffn_op_save(ctx, inputs, output) -> None:
    x, w1, _, w3, _, w2, _, c, time_col = inputs
    ctx.save_for_backward(x, output[1], output[2], c, w1, w3, w2)
    ctx.time_col = time_col


def _swiglu_ffn_op_backward(ctx, grad: Tensor, _grad_g, _grad_v):  # g and v feed nothing but the backward
    x, g, v, c, w1, w3, w2 = ctx.saved_tensors
    grads = _swiglu_ffn_backward_op(grad, x, g, v, c, w1, w3, w2, ctx.time_col)
    return (*(t if need else None for t, need in zip(grads, ctx.needs_input_grad)), None, None)


_swiglu_ffn_op.register_autograd(_swiglu_ffn_op_backward, setup_context=_swiglu_ffn_op_save)


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
