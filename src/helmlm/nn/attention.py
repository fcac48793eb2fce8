"""Multi-head self-attention: hyperbolic (Lorentz, with HoPE) and the Euclidean twin (RoPE).

Hyperbolic attention (MATH.md section 3) scores ``l_ij = (2c + 2<q_i, k_j>_L) / tau`` and returns the Lorentzian
centroid of the values with weights ``softmax(l_i)``. Writing ``q~ = (-q_t, q_s)``, ``2c + 2<q, k>_L = 2c + 2 q~.k``;
the constant cancels in the softmax and ``sum_j alpha_ij v_j`` is an ordinary attention output, so

    o = lorentz_normalize(SDPA(q~ * 2/tau, k, v, scale=1))

exactly. Running on ``scaled_dot_product_attention`` gives flash / memory-efficient kernels and O(N) memory.
:func:`naive_lorentz_attention` is the direct formula, kept as the test oracle.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import (
    as_curvature,
    lift,
    lift_chain_rule,
    lorentz_normalize,
    minkowski_inner,
    minkowski_sign,
    promote,
    sum_to_shape,
    time_from_space,
)
from helmlm.nn.cache import LayerCache
from helmlm.nn.linear import aligned_linear
from helmlm.nn.rotary import apply_rotary, rotate_pairs


def document_causal_mask(document_ids: Tensor) -> Tensor:
    """Boolean mask ``(B, 1, N, N)``, True where query ``i`` may attend key ``j``: ``j <= i`` and same document.

    ``document_ids`` (``(B, N)`` integers) label the packed documents of each row (padding may use its own label).
    The diagonal is always allowed, so no row is fully masked. On CPU the mask carries its documents' boundaries
    for :func:`attend` when each row's documents are contiguous runs (each id in one run; the O(N) check on the ids
    spares :func:`document_segments` its O(N^2) one).
    """
    n = document_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    mask = (same_doc & causal).unsqueeze(1)
    if mask.device.type == "cpu" and mask.dim() == 4 and mask.numel() and not torch.compiler.is_compiling():
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
        ids = document_ids.sort(dim=-1).values
        distinct = (ids[..., 1:] != ids[..., :-1]).sum(-1) + 1
        runs = starts.sum(-1)
        segments = None
        if torch.equal(runs, distinct) and int(runs.max()) <= MAX_SEGMENTS:
            segments = [[*row.nonzero().flatten().tolist(), n] for row in starts]
        mask._helmlm_segments = (mask._version, segments)
    return mask


QUERY_BLOCK = 256  # masked attention on CPU runs over blocks of this many queries (see attend)
MAX_SEGMENTS = 64  # ...or per document, for masks of at most this many documents per row


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """SDPA over ``(B, H, N, d)`` tensors; causal when ``mask`` is None, else the given boolean mask (True: may
    attend). The one attention kernel call of every attention layer, hyperbolic and Euclidean.

    With a mask, SDPA computes every query-key pair (a mask is not known to be causal), twice the work of the causal
    kernel and far more than packed documents need. On CPU, eager, longer than :data:`QUERY_BLOCK`:
    - a document-causal mask (each row a sequence of contiguous documents, each causal within itself; what
      training on packed documents gives) runs as one causal SDPA call per document and row
      (:func:`document_segments`);
    - any other mask goes in blocks of :data:`QUERY_BLOCK` queries, each against the span of keys its mask rows
      allow.
    Both give the one-call result up to summation order (docs/benchmarks.md has the times). Both read the mask on
    the host, a device synchronisation, so CUDA keeps one call (the FlexAttention path of benchmarks/gpu.py is the
    way to skip masked blocks there).
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    n = q.shape[-2]
    if n <= QUERY_BLOCK or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    segments = document_segments(mask) if q.shape[0] == mask.shape[0] and k.shape[-2] == n else None
    if segments is not None:  # unbind and split: their backward is one stack / cat, not a zero-fill per slice
        rows = []
        for bounds, *qkv in zip(segments, q.unbind(0), k.unbind(0), v.unbind(0)):
            sizes = [e - s for s, e in pairwise(bounds)]
            pieces = zip(*(t.unsqueeze(0).split(sizes, dim=-2) for t in qkv))  # 4-d: the flash kernel's layout
            rows.append(torch.cat([F.scaled_dot_product_attention(*p, is_causal=True, scale=scale) for p in pieces],
                                  dim=-2))
        return torch.cat(rows)
    blocks = []
    for start in range(0, n, QUERY_BLOCK):
        rows = mask[..., start:start + QUERY_BLOCK, :]
        keys = rows.flatten(0, -2).any(0).nonzero()
        lo, hi = (int(keys[0]), int(keys[-1]) + 1) if len(keys) else (0, k.shape[-2])
        blocks.append(F.scaled_dot_product_attention(q[..., start:start + QUERY_BLOCK, :], k[..., lo:hi, :],
                                                     v[..., lo:hi, :], attn_mask=rows[..., lo:hi], scale=scale))
    return torch.cat(blocks, dim=-2)


def document_segments(mask: Tensor) -> list[list[int]] | None:
    """The documents of a document-causal mask ``(B, 1, N, N)``: per row, the boundaries ``[0, ..., N]`` of its
    contiguous documents, or ``None`` when the mask is not exactly that (or a row has more than
    :data:`MAX_SEGMENTS` documents, where one call per document would cost more than it saves).

    A mask from :func:`document_causal_mask` brings the answer along. For any other, a document starts at query
    ``i`` where ``i`` may not attend key ``i - 1``; the mask those boundaries imply is built and compared with the
    given one, so any other mask (non-contiguous documents, padding conventions, a cache) is refused. Every
    attention layer of a forward pass gets the same mask tensor: the answer is kept on the tensor (with its version,
    so an in-place change invalidates it), and the check runs once per forward pass.
    """
    if (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != mask.shape[-2] or mask.dtype != torch.bool
            or not mask.numel() or mask.device.type != "cpu"):  # a CPU path: reading boundaries syncs a device
        return None
    version, segments = getattr(mask, "_helmlm_segments", (None, None))
    if version == mask._version:
        return segments
    starts = torch.ones(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
    starts[:, 1:] = ~mask[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1)
    segments = None
    if int(starts.sum(-1).max()) <= MAX_SEGMENTS:
        implied = document_causal_mask(starts.cumsum(-1))  # contiguous by construction: it carries its boundaries
        if torch.equal(implied, mask):
            segments = document_segments(implied)
    mask._helmlm_segments = (mask._version, segments)
    return segments


def lorentz_sdpa(q: Tensor, k: Tensor, v: Tensor, curvature: float | Tensor, temperature: Tensor,
                 mask: Tensor | None = None, value_dim: int | None = None) -> Tensor:
    """Hyperbolic attention of Lorentz points ``q, k, v`` (``(B, H, N, D)``, time first) through SDPA.

    ``value_dim``: only the values' first ``value_dim`` coordinates are real, the rest zero padding (the kernel
    wants one head dim for ``q``, ``k`` and ``v``); the output keeps those. When training, the output is laid out as
    ``(B, N, H, D)`` in memory, so that ``o.transpose(1, 2).flatten(-2)`` (merging the heads) is a view.

    Runs in fp32 or higher even under autocast: the output's Lorentz norm ``o_t^2 - |o_s|^2`` is a cancellation
    of large terms, and bf16 values (8-bit mantissa) would not even satisfy the constraint individually.
    The layers give the query as its space part to :func:`lorentz_query` and call :func:`lorentz_attend`, the
    same two steps.
    """
    with torch.autocast(q.device.type, enabled=False):
        q = promote(q)
        q_tilde = q * (minkowski_sign(q) * (2.0 / temperature.to(q.dtype)))
    return lorentz_attend(q_tilde, k, v, curvature, mask, value_dim)


def lorentz_query(space: Tensor, curvature: float | Tensor, temperature: Tensor,
                  rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The query as SDPA takes it, ``q~ = (2 / tau) (-q_t, q_s)`` with ``q = lift(space)``, in fp32 or higher;
    ``rotary = (cos, sin)``: HoPE first, ``q = lift(apply_rotary(space, cos, sin))``.

    Recording gradients, one autograd node (:class:`_LorentzQuery`) writes it in one pass and keeps only ``q~``
    (which the attention kernel keeps anyway) instead of the lifted query and its scaled copy; without ``rotary``
    the same values, bit for bit. With it, the node also rotates, using that a rotation keeps ``|s|``: the time
    comes from the unrotated space part and the backward is the unrotated one followed by the inverse rotation
    (equal to rounding).
    """
    with torch.autocast(space.device.type, enabled=False):
        space = promote(space)
        c = as_curvature(curvature, space)
        scale = 2.0 / temperature.to(space.dtype)
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and c.dim() == 0
                and any(t.requires_grad for t in (space, c, scale))):
            cos, sin = (None, None) if rotary is None else _head_tables(*rotary, space.dtype)
            return _LorentzQuery.apply(space, c, scale, cos, sin)
        if rotary is not None:
            space = apply_rotary(space, *rotary)
        q = lift(space, c)
        return q * (minkowski_sign(q) * scale)


def _head_tables(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos``/``sin`` of :func:`~helmlm.nn.rotary.rotary_tables` with a head axis, for ``(B, N, H, d)`` points."""
    return cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)


class _LorentzQuery(torch.autograd.Function):
    """:func:`lorentz_query`. With ``out = a (-t, R s)``, ``a = 2 / tau``, ``t = sqrt(|s|^2 + c)``, ``R`` the HoPE
    rotation (the identity without one): ``dL/ds = a R^T (g_s + (g_t / out_t) out_s)``, ``dL/dc = a^2 g_t /
    (2 out_t)``, ``dL/da = (g . out) / a``. The rotation's tables are scaled by ``a``: it scales as it rotates."""

    @staticmethod
    def forward(ctx, space: Tensor, c: Tensor, scale: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        out = space.new_empty(*space.shape[:-1], space.shape[-1] + 1)
        torch.mul(time_from_space(space, c), -scale, out=out[..., :1])
        if cos is None:
            torch.mul(space, scale, out=out[..., 1:])
            ctx.save_for_backward(out, scale)
        else:
            cos, sin = cos * scale, sin * scale
            rotate_pairs(space, cos, sin, out[..., 1:])
            ctx.save_for_backward(out, scale, cos, sin)
        ctx.c_shape = c.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, scale, *tables = ctx.saved_tensors
        coef, grad_space = lift_chain_rule(grad, out)  # on q~ itself: dL/ds = a R^T G (the class docstring)
        if not ctx.needs_input_grad[0]:
            grad_space = None
        elif tables:  # a R^T, through the scaled tables
            grad_space = rotate_pairs(grad_space, *tables, torch.empty_like(grad_space), inverse=True)
        else:
            grad_space.mul_(scale)
        grad_c = sum_to_shape(coef * (scale * scale / 2), ctx.c_shape) if ctx.needs_input_grad[1] else None
        grad_scale = (torch.linalg.vecdot(grad.flatten(), out.flatten()) / scale) if ctx.needs_input_grad[2] else None
        return grad_space, grad_c, grad_scale, None, None


def hope_lift(space: Tensor, cos: Tensor, sin: Tensor, curvature: float | Tensor) -> Tensor:
    """``lift(apply_rotary(space, cos, sin), c)``: HoPE keys as Lorentz points (``space`` ``(B, N, H, d)``).

    Recording gradients, one autograd node (:class:`_HoPELift`) that keeps only its output: the rotation writes
    straight into the point's space part and the time comes from the unrotated space part (a rotation keeps
    ``|s|``), where the two steps would write the rotated copy (through temporaries) and then the point."""
    space = promote(space)
    c = as_curvature(curvature, space)
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and c.dim() == 0
            and (space.requires_grad or c.requires_grad)):
        return _HoPELift.apply(space, c, *_head_tables(cos, sin, space.dtype))
    return lift(apply_rotary(space, cos, sin), c)


class _HoPELift(torch.autograd.Function):
    """:func:`hope_lift`: ``out = (t, R s)``, ``t = sqrt(|s|^2 + c)``; ``dL/ds = R^T (g_s + (g_t / t) out_s)``,
    ``dL/dc = sum(g_t / 2t)``."""

    @staticmethod
    def forward(ctx, space: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        out = space.new_empty(*space.shape[:-1], space.shape[-1] + 1)
        rotate_pairs(space, cos, sin, out[..., 1:])
        torch.sqrt(torch.linalg.vector_norm(space, dim=-1, keepdim=True).square_().add_(c), out=out[..., :1])
        ctx.save_for_backward(out, cos, sin)
        ctx.c_shape = c.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, cos, sin = ctx.saved_tensors
        coef, rotated = lift_chain_rule(grad, out)
        grad_space = rotate_pairs(rotated, cos, sin, torch.empty_like(rotated), inverse=True) \
            if ctx.needs_input_grad[0] else None
        grad_c = sum_to_shape(coef / 2, ctx.c_shape) if ctx.needs_input_grad[1] else None
        return grad_space, grad_c, None, None


def lorentz_attend(q_tilde: Tensor, k: Tensor, v: Tensor, curvature: float | Tensor, mask: Tensor | None = None,
                   value_dim: int | None = None) -> Tensor:
    """:func:`lorentz_sdpa` from the scaled query ``q~`` (:func:`lorentz_query`): SDPA at scale 1, then the
    Lorentzian centroid of the values."""
    with torch.autocast(q_tilde.device.type, enabled=False):
        q_tilde, k, v = promote(q_tilde), promote(k), promote(v)
        mixed = attend(q_tilde, k, v, mask, scale=1.0)
        if value_dim is not None:
            mixed = mixed[..., :value_dim]
        return lorentz_normalize(mixed, curvature, memory_order=(0, 2, 1, 3) if mixed.dim() == 4 else None)


def naive_lorentz_attention(q: Tensor, k: Tensor, v: Tensor, curvature: float | Tensor, temperature: Tensor,
                            mask: Tensor | None = None) -> Tensor:
    """The direct formula (N x N scores, softmax, Lorentzian centroid); the oracle for :func:`lorentz_sdpa`."""
    n = q.shape[-2]
    scores = (2 * curvature + 2 * minkowski_inner(q.unsqueeze(-2), k.unsqueeze(-3))) / temperature
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return lorentz_normalize(weights @ v, curvature)


class LorentzSelfAttention(nn.Module):
    """Hyperbolic multi-head self-attention with HoPE (HELM-D).

    The input is a Lorentz point with ``ambient`` coordinates. Each of the ``heads`` heads has
    ``head_ambient = ambient / heads`` coordinates, i.e. ``head_space = head_ambient - 1`` space coordinates
    produced by an affine map of the whole input; HoPE rotates the query/key space parts; the heads' output points
    are concatenated (``heads * head_ambient = ambient`` features) and mapped affinely to ``ambient - 1`` space
    coordinates, then lifted. ``temperature`` is the learnable score divisor ``tau`` (init ``sqrt(ambient)``).
    ``head_ambient`` sets the heads' width apart from the input's (default ``ambient / heads``; the hybrids of
    :mod:`helmlm.models.hybrid` put 65-coordinate heads on a 129-coordinate stream).
    """

    def __init__(self, ambient: int, heads: int, curvature: float = 1.0, temperature: float | None = None,
                 head_ambient: int | None = None):
        super().__init__()
        self.ambient, self.heads, self.curvature = ambient, heads, curvature
        self.head_ambient = ambient // heads if head_ambient is None else head_ambient
        self.head_space = self.head_ambient - 1
        self.qkv = nn.Linear(ambient, 3 * heads * self.head_space)
        self.out = nn.Linear(heads * self.head_ambient, ambient - 1)
        self.init_temperature = math.sqrt(ambient) if temperature is None else temperature
        self.temperature = nn.Parameter(torch.tensor(self.init_temperature))

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        self.out.reset_parameters()
        nn.init.constant_(self.temperature, self.init_temperature)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        """``cache``: keys and values (Lorentz points) of earlier tokens, extended by this call's; ``mask`` must
        then cover all cached keys (``(B, 1, N, T)``)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_space)).unbind(-3)  # space parts
        q = lorentz_query(q, self.curvature, self.temperature, rotary=(cos, sin))  # HoPE inside
        k, v = hope_lift(k, cos, sin, self.curvature), lift(v, self.curvature)
        if cache is not None:
            k, v = cache.append(k, v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = lorentz_attend(q, k, v, self.curvature, mask)  # (B, H, N, head_ambient)
        return lift(aligned_linear(o.transpose(1, 2).flatten(-2), self.out.weight, self.out.bias), self.curvature)


class SelfAttention(nn.Module):
    """Euclidean multi-head self-attention with RoPE (the LLaMA twin) on ``dim`` features: no biases, SDPA, output
    projection. ``head_dim`` sets the heads' width apart from the input's (default ``dim / heads``)."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = dim // heads if head_dim is None else head_dim
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, dim, bias=False)

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        self.out.reset_parameters()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.out(o.transpose(1, 2).flatten(-2))
