"""Pure functions on the Lorentz model (hyperboloid) of hyperbolic space.

Convention (MATH.md section 1): a point is ``x = (x_t, x_s)`` in ``R^(1+n)`` with
``<x, x>_L = -x_t^2 + |x_s|^2 = -c`` and ``x_t > 0``; the sectional curvature is ``K = -1/c``. ``n`` is the
*space dim*, ``n + 1`` the *ambient dim*. The time coordinate is always index 0 of the last axis.

Every function takes the curvature parameter ``c`` as a float or a tensor (broadcastable against the point's
leading axes with a trailing singleton, e.g. a 0-d tensor), so it can be learned.

Precision policy: the functions here are the manifold operations of the models. Inputs in a low-precision float
type (bf16/fp16) are promoted to fp32 before any arithmetic, because ``|x_s|^2`` is ~1e3-1e4 in these models and a
bf16 mantissa loses ``c`` entirely. fp32 and fp64 inputs are computed in their own precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "lift_concat",
    "lift_chain_rule",
    "promote",
    "minkowski_sign",
    "as_curvature",
    "minkowski_inner",
    "time_from_space",
    "lift",
    "lift_concat",
    "origin",
    "sq_distance",
    "distance",
    "expmap0",
    "logmap0",
    "project",
    "rescale_curvature",
    "lorentz_normalize",
    "centroid",
    "manifold_violation",
    "max_radius",
]

# Largest geodesic radius (in units of sqrt(c)) that expmap0 maps without overflowing |x|^2, per precision:
# cosh(r)^2 must stay below the dtype's max (fp32 ~3.4e38 -> r < 44.4, fp64 ~1.8e308 -> r < 354).
_MAX_RADIUS = {torch.float32: 40.0, torch.float64: 350.0}


def promote(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 to fp32; fp32 and fp64 pass through (the manifold-op precision policy).

    The one dtype-promotion rule of helmlm: the layers of :mod:`helmlm.nn` use it wherever they leave a low
    precision for a manifold operation or a normalisation."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def max_radius(dtype: torch.dtype) -> float:
    """Largest geodesic radius / sqrt(c) that :func:`expmap0` represents in ``dtype`` (larger radii are clamped)."""
    return _MAX_RADIUS.get(dtype, _MAX_RADIUS[torch.float32])


def as_curvature(c: float | Tensor, like: Tensor) -> Tensor:
    """Return ``c`` as a tensor on ``like``'s device, in ``like``'s (promoted) dtype; a tensor keeps its graph."""
    dtype = promote(like).dtype
    if isinstance(c, Tensor):
        return c.to(device=like.device, dtype=dtype)
    return torch.tensor(float(c), device=like.device, dtype=dtype)


def minkowski_sign(x: Tensor) -> Tensor:
    """The metric signature ``(-1, 1, ..., 1)`` as a vector matching ``x``'s last axis (its size, dtype, device).

    ``<x, y>_L = sum(x * y * sign)``; hyperbolic attention multiplies queries by it (``q~ = (-q_t, q_s)``)."""
    sign = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    sign[0] = -1
    return sign


def minkowski_inner(x: Tensor, y: Tensor, keepdim: bool = False) -> Tensor:
    """Minkowski inner product ``<x, y>_L = -x_t y_t + x_s . y_s`` over the last axis.

    Written as ``sum(x * y * sign)`` with the signature vector ``sign = (-1, 1, ..., 1)``: no slicing, so the
    backward pass does not materialise zero-padded slice gradients.
    """
    x, y = promote(x), promote(y)
    prod = x.square() if x is y else x * y
    return (prod * minkowski_sign(prod)).sum(-1, keepdim=keepdim)


def time_from_space(space: Tensor, c: float | Tensor, accurate: bool = False) -> Tensor:
    """Time coordinate of the point with space part ``s``: ``sqrt(|s|^2 + c)`` (shape ``(..., 1)``).

    ``accurate=True`` squares and accumulates ``|s|^2`` of an fp32 input in fp64 and rounds once. Use it where points
    have large norms and must sit on the hyperboloid to fp32's limit (the residual stream, |s| ~ 50-100): there fp32
    accumulation moves ``<x, x>_L`` by a visible fraction of ``c``, fp64 accumulation leaves only the rounding of
    ``x_t``. ``vector_norm`` does the cast inside its kernel (no fp64 copy of ``s``); still slower than fp32, so
    the layers use it for the residual stream only (measured: docs/precision.md).
    """
    space = promote(space)
    if accurate and space.dtype == torch.float32:
        sq = torch.linalg.vector_norm(space, dim=-1, keepdim=True, dtype=torch.float64).square()
        return (sq + as_curvature(c, space).double()).sqrt().float()
    c = as_curvature(c, space)
    if torch.is_grad_enabled() and (space.requires_grad or c.requires_grad):
        return _Time.apply(space, c)
    return (space.square().sum(-1, keepdim=True) + c).sqrt()


class _Time(torch.autograd.Function):
    """``time_from_space`` with a one-pass backward, ``d/ds = (g / t) s``, ``d/dc = g / 2t``, keeping only ``s`` (which
    its consumer, a linear layer, keeps anyway) and ``t``; autograd's graph of ``sqrt(sum(s^2) + c)`` makes three
    passes over ``s`` in backward and keeps ``s^2`` as well."""

    @staticmethod
    def forward(ctx, space: Tensor, c: Tensor) -> Tensor:
        time = (space.square().sum(-1, keepdim=True) + c).sqrt()
        ctx.save_for_backward(space, time)
        ctx.c_shape = c.shape
        return time

    @staticmethod
    def backward(ctx, grad: Tensor):
        space, time = ctx.saved_tensors
        coef = grad / time
        grad_space = space * coef if ctx.needs_input_grad[0] else None
        grad_c = sum_to_shape(coef / 2, ctx.c_shape) if ctx.needs_input_grad[1] else None
        return grad_space, grad_c


def sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient to ``shape`` (leading axes summed away, size-1 axes summed with keepdim)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad


def lift_chain_rule(grad: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient through a lift, from the lifted point ``out = (t, s)`` and the gradient ``grad`` at it:
    ``(coef, G)`` with ``coef = g_t / t`` and ``G = g_s + coef s`` (the space part's gradient; the curvature's is
    ``coef / 2``). Every fused node that ends in a lift starts its backward here."""
    coef = grad[..., :1] / out[..., :1]
    return coef, torch.addcmul(grad[..., 1:], out[..., 1:], coef)


class _Lift(torch.autograd.Function):
    """``lift`` with a one-pass backward: ``d/ds = g_s + (g_t / t) s``, ``d/dc = sum(g_t / 2t)``.

    Autograd's version of the same graph (cat, sqrt, sum, pow) takes three to four passes over ``s`` in the
    backward; ``lift`` runs ~10 times per block, so this is a measurable share of a HELM training step on CPU.
    """

    @staticmethod
    def forward(ctx, space: Tensor, c: Tensor, accurate: bool) -> Tensor:
        out = torch.cat([time_from_space(space, c, accurate), space], dim=-1)
        # Only the output is kept (the next layer keeps it anyway): keeping ``space`` would hold on to a second
        # copy, often the padded GEMM output it is a view of.
        ctx.save_for_backward(out)
        ctx.c_shape = c.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        coef, grad_space = lift_chain_rule(grad, out)
        grad_c = sum_to_shape(coef / 2, ctx.c_shape) if ctx.needs_input_grad[1] else None
        return grad_space if ctx.needs_input_grad[0] else None, grad_c, None


def lift(space: Tensor, c: float | Tensor, accurate: bool = False) -> Tensor:
    """The unique hyperboloid point with space part ``s``: ``(sqrt(|s|^2 + c), s)``.

    ``accurate``: accumulate ``|s|^2`` in fp64 for fp32 inputs (see :func:`time_from_space`).
    """
    space = promote(space)
    c = as_curvature(c, space)
    # No graph to record (inference, decoding: many small calls), or a curvature with more axes than the points
    # (plain autograd handles the broadcasting): the plain ops, without the autograd.Function's per-call overhead.
    if c.dim() > space.dim() or not (torch.is_grad_enabled() and (space.requires_grad or c.requires_grad)):
        return torch.cat([time_from_space(space, c, accurate), space], dim=-1)
    return _Lift.apply(space, c, accurate)


def lift_concat(parts: Sequence[Tensor], c: float | Tensor, width: int | None = None) -> Tensor:
    """``lift(torch.cat(parts, -1), c)``, zero-padded on the right to ``width`` coordinates when given, written into
    one buffer (the same values, bit for bit).

    Attention builds its keys and values this way: the concatenation, the lift and the padding to the kernel's head
    dim were three copies, each with its own backward. Recording gradients it is one autograd node
    (:class:`_LiftConcat`) that keeps only its output; parts may be broadcast views (``expand``).
    """
    parts = [promote(p) for p in parts]
    space = sum(p.shape[-1] for p in parts)
    width = 1 + space if width is None else width
    if width < 1 + space:
        raise ValueError(f"lift_concat: width {width} is less than the lifted point's {1 + space} coordinates")
    c = as_curvature(c, parts[0])
    if torch.compiler.is_compiling() or c.dim() > 0:
        out = lift(torch.cat(parts, dim=-1), c)
        return F.pad(out, (0, width - 1 - space)) if width > 1 + space else out
    if torch.is_grad_enabled() and (c.requires_grad or any(p.requires_grad for p in parts)):
        return _LiftConcat.apply(c, width, *parts)
    return _lift_concat(parts, c, width)


def _lift_concat(parts: list[Tensor], c: Tensor, width: int) -> Tensor:
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    out = parts[0].new_empty(*lead, width)
    start = 1
    for part in parts:
        out[..., start: start + part.shape[-1]].copy_(part)
        start += part.shape[-1]
    out[..., start:].zero_()
    torch.sqrt(out[..., 1:start].square().sum(-1, keepdim=True) + c, out=out[..., :1])
    return out


class _LiftConcat(torch.autograd.Function):
    """:func:`lift_concat`; backward as :class:`_Lift`'s, ``d/ds = g_s + (g_t / t) s``, split back into the parts."""

    @staticmethod
    def forward(ctx, c: Tensor, width: int, *parts: Tensor) -> Tensor:
        out = _lift_concat(list(parts), c, width)
        ctx.save_for_backward(out)
        ctx.c_shape, ctx.sizes = c.shape, [p.shape[-1] for p in parts]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        end = 1 + sum(ctx.sizes)  # the padding past it has no gradient
        coef, grad_space = lift_chain_rule(grad[..., :end], out[..., :end])
        grad_c = sum_to_shape(coef / 2, ctx.c_shape) if ctx.needs_input_grad[0] else None
        return grad_c, None, *grad_space.split(ctx.sizes, dim=-1)


def origin(space_dim: int, c: float | Tensor, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The origin ``o = (sqrt(c), 0, ..., 0)`` of the hyperboloid with ``space_dim`` space coordinates."""
    o = torch.zeros(space_dim + 1, dtype=dtype, device=device)
    o[0] = as_curvature(c, o).sqrt()
    return o


def sq_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared Lorentzian distance ``d2(x, y) = -2c - 2<x, y>_L`` of two points on the same hyperboloid.

    Computed as ``<x - y, x - y>_L``, which equals the formula on the manifold but does not cancel catastrophically
    for nearby points (and needs no ``c``); clamped at 0.
    """
    d = promote(x) - promote(y)
    return minkowski_inner(d, d).clamp_min(0)


def distance(x: Tensor, y: Tensor, c: float | Tensor) -> Tensor:
    """Geodesic distance ``sqrt(c) * arcosh(-<x, y>_L / c)``, accurate at every scale.

    Nearby points (``-<x, y>_L / c <= 2``): the equivalent ``2 sqrt(c) asinh(sqrt(d2) / (2 sqrt(c)))`` with
    ``d2 = <x - y, x - y>_L`` (since ``d2 = 4c sinh^2(d / (2 sqrt c))``), because arcosh of a number close to 1
    loses half the digits. Far points: the arcosh form, because ``d2`` then cancels catastrophically (its terms are
    ~``c e^(2r)`` while it is ~``c e^r``). The gradient is finite (zero) at ``x == y``.
    """
    x, y = promote(x), promote(y)
    sqrt_c = as_curvature(c, x).sqrt()
    z = -minkowski_inner(x, y) / sqrt_c.square()  # cosh(d / sqrt(c))
    near = z <= 2
    d2 = sq_distance(x, y)
    root = torch.where(d2 > 0, d2, torch.ones_like(d2)).sqrt() * (d2 > 0)  # sqrt with a finite gradient at 0
    near_d = 2 * sqrt_c * torch.asinh(root / (2 * sqrt_c))
    far_d = sqrt_c * torch.acosh(torch.where(near, torch.full_like(z, 2.0), z))
    return torch.where(near, near_d, far_d)


def _sinhc(r: Tensor) -> Tensor:
    """sinh(r) / r, with its Taylor series near 0 (where the ratio is 0/0)."""
    small = r < 1e-3
    safe = torch.where(small, torch.ones_like(r), r)
    return torch.where(small, 1 + r * r / 6, torch.sinh(safe) / safe)


def _asinhc(r: Tensor) -> Tensor:
    """asinh(r) / r, with its Taylor series near 0."""
    small = r < 1e-3
    safe = torch.where(small, torch.ones_like(r), r)
    return torch.where(small, 1 - r * r / 6, torch.asinh(safe) / safe)


def _norm(v: Tensor) -> Tensor:
    """Euclidean norm over the last axis (keepdim), free of overflow, whose gradient is finite at 0."""
    scale = v.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
    sq = (v / scale).square().sum(-1, keepdim=True)
    return torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() * (sq > 0) * scale


def expmap0(u: Tensor, c: float | Tensor) -> Tensor:
    """Exponential map at the origin of a tangent vector given by its space part ``u``.

    ``expmap0(u) = (sqrt(c) cosh(|u|/sqrt(c)), sqrt(c) sinh(|u|/sqrt(c)) u/|u|)``. The space part is written as
    ``u * sinh(r)/r`` (stable as ``|u| -> 0``) and the time is recomputed from it, so the result lies on the
    hyperboloid to working precision. The radius ``r = |u|/sqrt(c)`` is clamped at :func:`max_radius` so that
    huge inputs give finite points instead of ``inf``.
    """
    u = promote(u)
    sqrt_c = as_curvature(c, u).sqrt()
    r = _norm(u) / sqrt_c
    r_clamped = r.clamp_max(max_radius(u.dtype))
    # When clamped, shrink u to the clamped radius before scaling: u * (r_clamped / r) * sinhc(r_clamped).
    shrink = torch.where(r > r_clamped, r_clamped / torch.where(r > 0, r, torch.ones_like(r)), torch.ones_like(r))
    space = u * shrink * _sinhc(r_clamped)
    return lift(space, c)


def logmap0(x: Tensor, c: float | Tensor) -> Tensor:
    """Logarithmic map at the origin, returning the tangent vector's space part.

    ``logmap0(x) = sqrt(c) asinh(|x_s|/sqrt(c)) x_s/|x_s|``. Only the space part is used (the asinh form), which is
    stable near the origin, unlike ``arcosh(x_t/sqrt(c))``.
    """
    xs = promote(x)[..., 1:]
    sqrt_c = as_curvature(c, xs).sqrt()
    r = _norm(xs) / sqrt_c
    return xs * _asinhc(r)


def project(x: Tensor, c: float | Tensor) -> Tensor:
    """Project onto the hyperboloid by recomputing the time coordinate from the space part (``lift(x_s)``)."""
    return lift(promote(x)[..., 1:], c)


def rescale_curvature(x: Tensor, c_from: float | Tensor, c_to: float | Tensor) -> Tensor:
    """Map a point of the ``c_from`` hyperboloid onto the ``c_to`` one: ``x * sqrt(c_to / c_from)``."""
    x = promote(x)
    return x * (as_curvature(c_to, x) / as_curvature(c_from, x)).sqrt()


def lorentz_normalize(a: Tensor, c: float | Tensor, eps: float = 1e-8, *,
                      memory_order: tuple[int, ...] | None = None) -> Tensor:
    """Rescale a time-like vector onto the hyperboloid: ``sqrt(c) a / sqrt(|<a, a>_L|)``.

    For ``a`` a positive combination of hyperboloid points this is their weighted Lorentzian centroid. ``eps``
    bounds the denominator away from 0. ``memory_order`` (a permutation of the axes, training path only): the
    result's axes in the order they are laid out in memory, e.g. ``(0, 2, 1, 3)`` writes attention's ``(B, H, N,
    D)`` output as ``(B, N, H, D)``, so that the heads are then merged by a view and not by a copy that the next
    product would keep as well.
    """
    a = promote(a)
    c = as_curvature(c, a)
    if c.dim() == 0 and torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
            a.requires_grad or c.requires_grad):
        return _LorentzNormalize.apply(a, c, eps, memory_order)
    denom = minkowski_inner(a, a, keepdim=True).abs().clamp_min(eps).sqrt()
    return a * (c.sqrt() / denom)  # one pass over `a`; the factor is per point


class _LorentzNormalize(torch.autograd.Function):
    """:func:`lorentz_normalize` with a closed-form backward. With ``out = f a``, ``f = sqrt(c / m)``,
    ``m = |<a, a>_L|`` and ``s = sign <a, a>_L`` (0 where ``m`` is clamped at ``eps``):
    ``dL/da = f g - (s / (m f)) (g . out) J out`` (``J = diag(-1, 1, ..., 1)``) and ``dL/dc = sum (g . out) / 2c``.
    Forward reads ``a`` once and writes ``out``; backward makes three passes and keeps ``out`` and per-point
    scalars, where autograd's graph of the formula keeps ``a`` and ``a^2`` and takes about eight passes."""

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor, eps: float, memory_order: tuple[int, ...] | None = None) -> Tensor:
        space = a[..., 1:]
        inner = torch.linalg.vecdot(space, space).unsqueeze(-1) - a[..., :1].square()
        m = inner.abs().clamp_min(eps)
        factor = (c / m).sqrt()
        if memory_order is None:
            out = a * factor
        else:  # an empty buffer laid out in that order, viewed back in a's axis order
            inverse = sorted(range(a.dim()), key=memory_order.__getitem__)
            out = torch.mul(a, factor, out=a.new_empty([a.shape[i] for i in memory_order]).permute(inverse))
        ctx.save_for_backward(out, factor, inner.sign() * (inner.abs() > eps) / m, c)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, factor, sign_over_m, c = ctx.saved_tensors
        dot = torch.linalg.vecdot(grad, out).unsqueeze(-1)  # g . out
        grad_a = None
        if ctx.needs_input_grad[0]:
            coef = sign_over_m * dot / factor
            grad_a = torch.mul(grad, factor).addcmul_(out, coef, value=-1)
            grad_a[..., :1].addcmul_(out[..., :1], coef, value=2)  # J flips the time coordinate's sign
        grad_c = (dot / (2 * c)).sum().reshape(c.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_c, None, None


def centroid(x: Tensor, c: float | Tensor, weights: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Weighted Lorentzian centroid of points ``x`` (``(..., M, D)``) with weights ``(..., K, M)`` (or uniform).

    ``a = weights @ x``, ``mu = sqrt(c) a / sqrt(|<a, a>_L|)``. With ``weights=None`` returns the centroid of the
    ``M`` points (shape ``(..., D)``); with weights, one centroid per weight row (shape ``(..., K, D)``).
    """
    x = promote(x)
    a = x.mean(dim=-2) if weights is None else promote(weights).to(x.dtype) @ x
    return lorentz_normalize(a, c, eps)


def manifold_violation(x: Tensor, c: float | Tensor, relative_to: str = "curvature") -> Tensor:
    """Constraint violation ``|<x, x>_L + c|`` of each point, evaluated in fp64, relative to ``c`` or to ``x_t^2``.

    ``relative_to="curvature"`` divides by ``c``: "is this point on *this* hyperboloid", meaningful while
    ``x_t^2`` is not orders of magnitude above ``c`` (fp32 rounding alone contributes ~``1e-7 x_t^2 / c``).
    ``relative_to="scale"`` divides by ``x_t^2 = |x_s|^2 + c``: the error relative to the size of the terms,
    i.e. "on the manifold to the precision its coordinates can hold", meaningful at any norm.
    Evaluating in fp64 measures the *stored* point, not the rounding of the check. Points on the lower sheet
    (``x_t <= 0``) report ``inf``.
    """
    if relative_to not in ("curvature", "scale"):
        raise ValueError(f"relative_to must be 'curvature' or 'scale', got {relative_to!r}")
    x64 = x.detach().double()
    c64 = as_curvature(c, x64).detach()
    err = (minkowski_inner(x64, x64) + c64).abs()
    v = err / (c64 if relative_to == "curvature" else x64[..., 0].square())
    return torch.where(x64[..., 0] > 0, v, torch.full_like(v, float("inf")))
