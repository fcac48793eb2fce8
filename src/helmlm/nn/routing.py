"""Routing shared by HELM-MiCE and its Euclidean MoE twin (MATH.md section 5): gate, dispatch, balancing.

- :class:`Gate` scores experts and picks the top-k; a load-balancing ``bias`` buffer shifts only the selection.
- :func:`route_by_expert` sorts the ``T * k`` (token, slot) assignments by expert on the device, and
  :func:`grouped_linear` runs one matmul per expert over its contiguous rows (``torch.nn.functional.grouped_mm``
  with the group offsets as a device tensor). Nothing in the forward pass reads routing data on the host, so a
  layer never synchronises, and the routed FLOPs are exactly ``k / E`` of running every expert on every token.
- :class:`RoutedFFN` is the base of MiCE and MoE: it routes, keeps sync-free routing statistics in buffers
  (tokens and summed scores per expert, over real tokens only) and the layer's sequence-level balance loss.
- Balancing: :func:`sequence_balance_loss` (auxiliary loss) and :func:`update_balance_bias` (loss-free bias
  update); :func:`balance_step` applies the bias update to every routed layer of a model once per optimizer step,
  with one all-reduce for all layers when ``torch.distributed`` is initialised.

Names: the layers take the routing settings under the names of :class:`~helmlm.models.HELMConfig`
(``n_routed_experts``, ``n_activated_experts`` = top-k, ``n_expert_groups``, ``n_limited_groups``,
``n_shared_experts``). Allowed choices: each choice list is defined once, as a ``Literal`` type and its tuple of
values, in the lowest module that uses it (``SCORE_FUNCS`` and ``DISPATCHES`` here, ``COMBINE_MODES`` in
:mod:`helmlm.nn.mice`), and ``models/config.py`` imports them to validate the config instead of repeating them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.nn.linear import gemm_pad

ScoreFunc = Literal["softmax", "sigmoid"]
Dispatch = Literal["auto", "grouped", "dense"]
SCORE_FUNCS: tuple[str, ...] = get_args(ScoreFunc)
DISPATCHES: tuple[str, ...] = get_args(Dispatch)


class Gate(nn.Module):
    """Top-k router: ``s = softmax|sigmoid(W_g x)`` in fp32 (fp64 for fp64 inputs); ``bias`` only selects.

    ``x`` are the features the gate sees (MiCE passes the space part of a Lorentz point). Returns
    ``(weights (T, k), indices (T, k), scores (T, E))``: the weights are the selected un-biased scores, renormalised
    to sum 1 when ``renormalize``, times ``route_scale``. With ``n_expert_groups > 1`` selection is limited to the
    ``n_limited_groups`` groups with the highest sum of their top-2 biased scores (DeepSeek-V3's group-limited
    routing).
    """

    def __init__(self, dim: int, n_routed_experts: int, n_activated_experts: int, score_func: ScoreFunc = "softmax",
                 route_scale: float = 1.0, n_expert_groups: int = 1, n_limited_groups: int = 1,
                 renormalize: bool = True, init_gain: float = 1.0):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        self.n_routed_experts, self.n_activated_experts = n_routed_experts, n_activated_experts
        self.score_func, self.route_scale, self.renormalize = score_func, route_scale, renormalize
        self.n_expert_groups, self.n_limited_groups = n_expert_groups, n_limited_groups
        self.weight = nn.Parameter(torch.empty(n_routed_experts, dim))
        self.register_buffer("bias", torch.zeros(n_routed_experts))
        self.init_gain = init_gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform with gain ``init_gain`` (1 in the reference), which sets the scale of the initial logits."""
        nn.init.xavier_uniform_(self.weight, gain=self.init_gain)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = F.linear(x, self.weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        biased = scores + self.bias.to(scores.dtype)
        if self.n_expert_groups > 1:
            grouped = biased.unflatten(-1, (self.n_expert_groups, -1))
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_scores.topk(self.n_limited_groups, dim=-1).indices
            blocked = torch.ones_like(group_scores, dtype=torch.bool).scatter(-1, keep, False)
            biased = grouped.masked_fill(blocked.unsqueeze(-1), float("-inf")).flatten(-2)
        indices = biased.topk(self.n_activated_experts, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.route_scale, indices, scores


@dataclass
class ExpertRoute:
    """The ``T * k`` routed rows sorted by expert: row ``r`` is token ``token[r]`` for expert ``expert[r]``;
    ``order[r]`` is its position in the flattened ``(T, k)`` assignment; expert ``e`` owns rows
    ``[offs[e-1], offs[e])``."""

    order: Tensor
    token: Tensor
    expert: Tensor
    offs: Tensor

    def unsort(self, rows: Tensor, n_activated_experts: int) -> Tensor:
        """Rows in expert order -> ``(T, k, ...)`` in (token, slot) order (``k = n_activated_experts``)."""
        out = torch.empty_like(rows).index_copy(0, self.order, rows)
        return out.unflatten(0, (-1, n_activated_experts))


def route_by_expert(indices: Tensor, n_routed_experts: int) -> ExpertRoute:
    """Sort top-k assignments ``indices (T, k)`` by expert (stable, so rows keep token order within an expert)."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(n_routed_experts, dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add_(0, flat, torch.ones_like(flat))
    return ExpertRoute(order, order // indices.shape[-1], flat[order], counts.cumsum(0).to(torch.int32))


def grouped_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype in which :func:`grouped_linear` runs for inputs like ``x``, or ``None`` where it cannot
    (no ``grouped_mm`` in this torch, fp64, or a device/dtype without a kernel): callers then use the dense path.

    On CPU the grouped kernel runs in fp32 (its bf16 kernel is much slower; measured: docs/LOG.md), also inside
    ``torch.compile`` (through :func:`cpu_grouped_mm`); on CUDA in bf16, the dtype its kernels support, when the
    input is bf16 or bf16 autocast is on.
    """
    if not hasattr(F, "grouped_mm") or x.dtype == torch.float64:
        return None
    if x.device.type == "cpu":
        return torch.float32
    if x.device.type == "cuda":
        autocast_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        if x.dtype == torch.bfloat16 or autocast_bf16:
            return torch.bfloat16
    return None


def grouped_linear(x: Tensor, weight: Tensor, route: ExpertRoute) -> Tensor:
    """``y_r = W[e_r] x_r`` for rows ``x (R, in)`` sorted by expert; ``weight (E, out, in)`` (biases: append a ones
    column with :func:`with_bias_column` and lay the weight out with :func:`bias_weight`).

    ``grouped_mm`` needs 16-byte aligned row strides, so ``in`` and ``out`` are zero-padded by :func:`gemm_pad`
    (exact: padded inputs meet zero weights, padded outputs are dropped; it also keeps BLAS on its fast widths).
    """
    out_dim, in_dim = weight.shape[1:]
    pad_in, pad_out = gemm_pad(in_dim), gemm_pad(out_dim)
    if pad_in:
        x = F.pad(x, (0, pad_in))
    if pad_in or pad_out:
        weight = F.pad(weight, (0, pad_in, 0, pad_out))
    weight = weight.to(x.dtype).transpose(1, 2)
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32:
        y = cpu_grouped_mm(x, weight, route.offs)
    else:
        y = F.grouped_mm(x, weight, offs=route.offs)
    return y[:, :out_dim] if pad_out else y


# The fp32 CPU kernel of ``grouped_mm`` runs in eager mode, but its fake-tensor rule (what torch.compile traces
# with) accepts bf16 only. These two custom ops hide the kernel from the tracer, which then sees their shapes (the
# registered fake functions) and calls them as opaque kernels; the backward is written with the same two ops.
@torch.library.custom_op("helmlm::cpu_grouped_mm", mutates_args=())
def cpu_grouped_mm(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """``F.grouped_mm(x, weight, offs=offs)`` for ``x (rows, in)``, ``weight (E, in, out)``: ``(rows, out)``,
    traceable by ``torch.compile`` on CPU in fp32."""
    return F.grouped_mm(x.contiguous(), weight, offs=offs)  # a traced backward may hand in an expanded gradient


@cpu_grouped_mm.register_fake
def _(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[-1])


@torch.library.custom_op("helmlm::cpu_grouped_mm_weight_grad", mutates_args=())
def _cpu_grouped_mm_weight_grad(x: Tensor, grad: Tensor, offs: Tensor) -> Tensor:
    """Per group ``e``, ``x_e^T grad_e``: the gradient of :func:`cpu_grouped_mm` in its weight, ``(E, in, out)``."""
    return F.grouped_mm(x.contiguous().t(), grad.contiguous(), offs=offs)


@_cpu_grouped_mm_weight_grad.register_fake
def _(x: Tensor, grad: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _cpu_grouped_mm_backward(ctx, grad: Tensor):
    x, weight, offs = ctx.saved_tensors
    grad_x = cpu_grouped_mm(grad, weight.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_w = _cpu_grouped_mm_weight_grad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


def _cpu_grouped_mm_save(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


cpu_grouped_mm.register_autograd(_cpu_grouped_mm_backward, setup_context=_cpu_grouped_mm_save)


def with_bias_column(x: Tensor) -> Tensor:
    """``[x, 1, 0, ...]``, zero-padded to an aligned width (:func:`gemm_pad`), built in one copy: a weight laid out
    by :func:`bias_weight` then computes ``W x + b`` in its GEMM."""
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    pad = torch.zeros(*x.shape[:-1], gemm_pad(x.shape[-1] + 1), dtype=x.dtype, device=x.device)
    return torch.cat([x, ones, pad], dim=-1)


def bias_weight(weight: Tensor, bias: Tensor, width: int) -> Tensor:
    """``[W | b | 0]``: expert weights ``(E, out, in)`` with the bias ``(E, out)`` as column ``in`` and zero columns
    up to ``width`` (the width of the input from :func:`with_bias_column`)."""
    pad = width - weight.shape[-1] - 1
    return torch.cat([weight, bias.unsqueeze(-1), weight.new_zeros(*weight.shape[:-1], pad)], dim=-1)


def sequence_balance_loss(scores: Tensor, indices: Tensor, valid: Tensor | None = None) -> Tensor:
    """Sequence-level balance loss ``mean_b sum_i f_{b,i} P_{b,i}`` over real tokens (MATH.md section 5).

    ``scores (B, N, E)``, ``indices (B, N, k)``, ``valid (B, N)`` (False for padding, which counts nowhere).
    Per sequence ``b`` with ``T_b`` real tokens: ``f_i = E / (k T_b) * #{t: i in topk(t)}`` and ``P_i = mean_t
    s_{t,i} / sum_j s_{t,j}``; ``f`` has no gradient. The value is 1 for a perfectly uniform router and grows with
    imbalance (up to ``E / k``); sequences without real tokens are skipped. Multiply by the config's alpha.
    """
    n_routed_experts, n_activated_experts = scores.shape[-1], indices.shape[-1]
    if valid is None:
        valid = torch.ones(scores.shape[:-1], dtype=torch.bool, device=scores.device)
    w = valid.to(scores.dtype)
    real = w.sum(-1)  # (B,)
    with torch.no_grad():
        hits = torch.zeros_like(scores).scatter_add_(-1, indices, w.unsqueeze(-1).expand_as(indices).contiguous())
        f = hits.sum(-2) * n_routed_experts / (n_activated_experts * real.clamp(min=1).unsqueeze(-1))  # (B, E)
    p = ((scores / scores.sum(-1, keepdim=True)) * w.unsqueeze(-1)).sum(-2) / real.clamp(min=1).unsqueeze(-1)
    per_sequence = (f * p).sum(-1)
    has_tokens = (real > 0).to(scores.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1)


@torch.no_grad()
def update_balance_bias(bias: Tensor, counts: Tensor, speed: float = 0.005) -> Tensor:
    """Loss-free balancing, in place: ``b += speed * (mean(u) - u)`` with ``u = counts / sum(counts)`` the
    expert load fractions (counts accumulated over an optimizer step, already summed over ranks). Returns ``u``.

    Proportional, as in the reference (DeepSeek-V3 uses ``sign(mean(u) - u)``). No-op for all-zero counts.
    """
    counts = counts.to(bias.device, torch.float64)
    load = counts / counts.sum().clamp(min=1)
    bias += (speed * (load.mean() - load) * (counts.sum() > 0)).to(bias.dtype)
    return load


DENSE_BELOW_TOKENS = 16  # dispatch="auto": this many tokens or fewer run every expert densely


class RoutedFFN(nn.Module):
    """Base of routed feed-forward layers (MiCE, MoE): routing, sync-free statistics, balance loss.

    Subclasses define ``self.gate``, ``self.experts`` (``experts(x) -> (E, T, W)`` for every expert on every token,
    ``experts.forward_rows(x, route)`` for the routed rows only) and the combination. Buffers (not saved;
    all-reduce-ready): ``tokens_per_expert`` (real tokens routed to each expert since the last
    :meth:`reset_stats`, counted in training mode only), ``score_sum`` (their summed gate scores) and
    ``tokens_seen``.
    ``aux_loss`` holds the latest forward's :func:`sequence_balance_loss`.
    """

    def _init_routing(self, n_routed_experts: int, dispatch: Dispatch) -> None:
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.dispatch = dispatch
        # Counts are int64, so a model cast to bf16 cannot round them.
        self.register_buffer("tokens_per_expert", torch.zeros(n_routed_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("score_sum", torch.zeros(n_routed_experts), persistent=False)
        self.aux_loss: Tensor | None = None

    def route(self, features: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Gate ``features (B, N, d)``; update statistics and ``aux_loss``; return ``(weights, indices)`` flat."""
        weights, indices, scores = self.gate(features)
        self.aux_loss = sequence_balance_loss(scores, indices, valid)
        if not self.training:  # evaluation must not feed the bias update
            return weights.flatten(0, -2), indices.flatten(0, -2)
        with torch.no_grad():
            real = (torch.ones(scores.shape[:-1], dtype=torch.int64, device=scores.device) if valid is None
                    else valid.long()).flatten()
            self.tokens_per_expert.index_add_(0, indices.flatten(), real.repeat_interleave(indices.shape[-1]))
            self.score_sum += (scores.flatten(0, -2) * real.unsqueeze(-1)).sum(0).to(self.score_sum.dtype)
            self.tokens_seen += real.sum()
        return weights.flatten(0, -2), indices.flatten(0, -2)

    def use_grouped(self, x: Tensor) -> torch.dtype | None:
        """The grouped kernel's dtype for this input, or ``None`` to run every expert densely. ``auto`` also runs
        densely for a handful of tokens (decoding steps), where the grouped path's fixed cost (sorting, gathers,
        padding) outweighs computing every expert (measured: docs/benchmarks.md, decoding)."""
        if self.dispatch == "dense":
            return None
        if self.dispatch == "auto" and x[..., 0].numel() <= DENSE_BELOW_TOKENS:
            return None
        dtype = grouped_dtype(x)
        if dtype is None and self.dispatch == "grouped":
            raise RuntimeError(f"dispatch='grouped' is not available for {x.dtype} on {x.device.type} "
                               "(use dispatch='auto' to fall back to the dense path)")
        return dtype

    def routed_outputs(self, x: Tensor, indices: Tensor) -> Tensor:
        """Expert outputs for each (token, slot): ``x (T, W)``, ``indices (T, k)`` -> ``(T, k, W)``.

        Grouped: only the selected (token, expert) pairs are computed. Dense (fp64 and the fallback): every expert
        on every token, then a gather (exact, ``E / k`` times the FLOPs)."""
        dtype = self.use_grouped(x)
        if dtype is not None:
            route = route_by_expert(indices, self.gate.n_routed_experts)
            rows = self.experts.forward_rows(x.to(dtype), route)
            return route.unsort(rows, indices.shape[-1]).to(torch.promote_types(x.dtype, rows.dtype))
        every = self.experts(x)  # (E, T, W)
        return every[indices, torch.arange(x.shape[0], device=x.device).unsqueeze(-1)]

    @torch.no_grad()
    def reset_stats(self) -> None:
        self.tokens_per_expert.zero_()
        self.score_sum.zero_()
        self.tokens_seen.zero_()


def routed_layers(model: nn.Module) -> list[tuple[str, RoutedFFN]]:
    """The routed FFN layers of a model, with their qualified names (in module order, identical on every rank)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedFFN)]


@torch.no_grad()
def routing_stats(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """Per routed layer, since the last reset: ``load`` (fraction of routed real tokens per expert), ``mean_score``
    (mean gate score per expert) and ``bias``. Reads the buffers on the host; call it when logging."""
    stats = {}
    for name, layer in routed_layers(model):
        counts = layer.tokens_per_expert.double()
        stats[name] = {
            "load": (counts / counts.sum().clamp(min=1)).tolist(),
            "mean_score": (layer.score_sum.double() / layer.tokens_seen.double().clamp(min=1)).tolist(),
            "bias": layer.gate.bias.tolist(),
        }
    return stats


@torch.no_grad()
def balance_step(model: nn.Module, speed: float = 0.005, process_group=None) -> Tensor | None:
    """Loss-free balancing for every routed layer; call once per optimizer step (after the micro-batches).

    Concatenates the layers' ``tokens_per_expert`` into one tensor, sums it over ranks with a single
    all-reduce when ``torch.distributed`` is initialised (every rank then applies the same update, so biases stay
    identical without a broadcast), updates each gate's bias with :func:`update_balance_bias`, and resets the
    statistics. Returns the ``(layers, E)`` load fractions, or ``None`` for a model without routed layers.
    """
    layers = [layer for _, layer in routed_layers(model)]
    if not layers:
        return None
    counts = torch.cat([layer.tokens_per_expert for layer in layers])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=process_group)
    counts = counts.split([layer.tokens_per_expert.numel() for layer in layers])
    loads = torch.stack([update_balance_bias(layer.gate.bias, c, speed) for layer, c in zip(layers, counts)])
    for layer in layers:
        layer.reset_stats()
    return loads
