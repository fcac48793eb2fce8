"""MiCE: mixture of curvature experts (MATH.md section 5).

A gate scores experts from the space part of each token; a load-balancing bias (a buffer, updated outside
autograd) shifts only the *selection* of the top-k experts, the routing weights are the un-biased scores. Routed
expert ``i`` is an HFFN on its own hyperboloid of curvature parameter ``c_i > 0`` (stored as ``log c_i``, so it stays
positive under any optimizer step): the token moves there by ``sqrt(c_i / c)``, the HFFN runs there, and the output
returns by ``sqrt(c / c_i)``. Shared experts are one HFFN on the input manifold applied to every token.

Combination (``combine``):
- ``"paper"``: one Lorentzian centroid of the weighted routed outputs and the shared output (the block's Lorentzian
  residual then adds the input);
- ``"reference"``: the reference implementation's sequential folding — start at the origin, fold the routed outputs
  in ascending expert index with a Lorentzian residual (weight = routing weight, fixed space scale 2), then combine
  shared and routed with a Lorentzian residual (learnable weight, learnable scale init 2) — for checkpoint parity.

Dispatch is synchronisation-free: every expert runs as one batched matmul over all tokens and each token gathers its
top-k outputs (exact; it computes ``E / k`` times the routed FLOPs, the price of having no data-dependent shapes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift, lorentz_normalize, origin
from helmlm.geometry.lorentz import _promote
from helmlm.nn.ffn import LorentzFeedForward
from helmlm.nn.residual import LorentzResidual

COMBINE_MODES = ("paper", "reference")
_LOG_C_LIMIT = 9.2
SCORE_FUNCS = ("softmax", "sigmoid")


class Gate(nn.Module):
    """Top-k router: ``s = softmax|sigmoid(W_g x_s)`` in fp32 (or fp64 for fp64 inputs); ``bias`` only selects.

    Returns ``(weights (T, k), indices (T, k), scores (T, E))``. Weights are the selected un-biased scores,
    renormalised to sum 1 when ``renormalize``, times ``route_scale``. With ``n_groups > 1`` selection is limited to
    the ``topk_groups`` groups with the highest sum of their top-2 biased scores (DeepSeek-V3).
    """

    def __init__(self, space_dim: int, n_experts: int, topk: int, score_func: str = "softmax",
                 route_scale: float = 1.0, n_groups: int = 1, topk_groups: int = 1, renormalize: bool = True):
        super().__init__()
        self.n_experts, self.topk, self.score_func, self.route_scale = n_experts, topk, score_func, route_scale
        self.n_groups, self.topk_groups, self.renormalize = n_groups, topk_groups, renormalize
        self.weight = nn.Parameter(torch.empty(n_experts, space_dim))
        self.register_buffer("bias", torch.zeros(n_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = F.linear(x[..., 1:], self.weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        biased = scores + self.bias.to(scores.dtype)
        if self.n_groups > 1:
            grouped = biased.unflatten(-1, (self.n_groups, -1))
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            blocked = torch.ones_like(group_scores, dtype=torch.bool).scatter(-1, keep, False)
            biased = grouped.masked_fill(blocked.unsqueeze(-1), float("-inf")).flatten(-2)
        indices = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.route_scale, indices, scores


class LorentzExperts(nn.Module):
    """``n`` HFFN experts with stacked weights, each on its own curvature ``c_i = exp(log_curvature_i)``."""

    def __init__(self, n: int, width: int, hidden: int, curvatures: list[float], learn_curvature: bool = True,
                 curvature: float = 1.0):
        super().__init__()
        if len(curvatures) != n or min(curvatures) <= 0:
            raise ValueError(f"need {n} positive expert curvatures, got {curvatures}")
        self.n, self.width, self.hidden, self.curvature = n, width, hidden, curvature
        self.w1 = nn.Parameter(torch.empty(n, hidden - 1, width))
        self.b1 = nn.Parameter(torch.empty(n, hidden - 1))
        self.w3 = nn.Parameter(torch.empty(n, hidden - 1, width))
        self.b3 = nn.Parameter(torch.empty(n, hidden - 1))
        self.w2 = nn.Parameter(torch.empty(n, width - 1, hidden))
        self.b2 = nn.Parameter(torch.empty(n, width - 1))
        self.init_curvatures = list(curvatures)
        self.log_curvature = nn.Parameter(torch.empty(n), requires_grad=learn_curvature)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Per expert as LorentzLinear: Xavier-uniform with gain sqrt(2), zero biases; curvatures at their init."""
        for w in (self.w1, self.w3, self.w2):
            fan_out, fan_in = w.shape[1:]
            bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
            w.uniform_(-bound, bound)
        for b in (self.b1, self.b3, self.b2):
            b.zero_()
        self.log_curvature.copy_(torch.tensor(self.init_curvatures, dtype=torch.float64).log())

    @property
    def curvatures(self) -> Tensor:
        """The experts' curvature parameters ``c_i``: ``exp(log c_i)`` with ``log c_i`` clamped to ``[-9.2, 9.2]``
        (``c_i`` in [1e-4, 1e4]), so they stay positive and finite after any optimizer step (a bare ``exp``
        underflows to 0 or overflows after a huge one)."""
        return self.log_curvature.clamp(-_LOG_C_LIMIT, _LOG_C_LIMIT).exp()

    def forward(self, x: Tensor) -> Tensor:
        """All experts on all tokens: ``x (T, width)`` on the input manifold -> ``(n, T, width)`` on it too."""
        c_e = self.curvatures.to(_promote(x).dtype).view(-1, 1, 1)
        to_expert = (c_e / self.curvature).sqrt()
        xe = x.unsqueeze(0) * to_expert
        gate = torch.baddbmm(self.b1.unsqueeze(1), xe, self.w1.transpose(1, 2))
        up = torch.baddbmm(self.b3.unsqueeze(1), xe, self.w3.transpose(1, 2))
        hidden = lift(F.silu(gate) * up, c_e)
        out = torch.baddbmm(self.b2.unsqueeze(1), hidden, self.w2.transpose(1, 2))
        return lift(out, c_e) / to_expert


class MiCE(nn.Module):
    """Mixture of curvature experts on Lorentz tokens ``(..., width)``; returns points on the input manifold.

    ``tokens_per_expert`` (a buffer) accumulates the routed assignments of every forward pass, without a host
    synchronisation, for the trainer's load-balancing bias update (read and reset once per optimizer step).
    ``last_routing`` keeps the latest ``(indices, scores)`` for the balance loss and statistics.
    """

    def __init__(self, width: int, hidden: int, n_routed: int, topk: int, n_shared: int = 1,
                 curvatures: list[float] | None = None, learn_curvature: bool = True, score_func: str = "softmax",
                 route_scale: float = 1.0, n_groups: int = 1, topk_groups: int = 1, combine: str = "paper",
                 renormalize: bool | None = None, curvature: float = 1.0):
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.width, self.topk, self.combine, self.curvature = width, topk, combine, curvature
        if renormalize is None:  # the paper renormalises; the reference only does for sigmoid scores
            renormalize = combine == "paper" or score_func == "sigmoid"
        if curvatures is None:
            curvatures = [1.0] * n_routed
        self.gate = Gate(width - 1, n_routed, topk, score_func, route_scale, n_groups, topk_groups, renormalize)
        self.experts = LorentzExperts(n_routed, width, hidden, curvatures, learn_curvature, curvature)
        self.shared = LorentzFeedForward(width, n_shared * hidden, curvature) if n_shared > 0 else None
        if combine == "reference":
            self.fold = LorentzResidual(weight=1.0, scale=2.0, curvature=curvature)
            self.shared_residual = LorentzResidual(scale=2.0, learn_scale=True, curvature=curvature)
        self.register_buffer("tokens_per_expert", torch.zeros(n_routed), persistent=False)
        self.last_routing: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.width)
        weights, indices, scores = self.gate(x)
        self.last_routing = (indices, scores)
        with torch.no_grad():
            self.tokens_per_expert += torch.zeros_like(self.tokens_per_expert).scatter_add_(
                0, indices.flatten(), torch.ones_like(indices.flatten(), dtype=self.tokens_per_expert.dtype))
        expert_out = self.experts(x)  # (E, T, width)
        tokens = torch.arange(x.shape[0], device=x.device).unsqueeze(-1)
        if self.combine == "reference":
            indices, order = indices.sort(dim=-1)  # fold in ascending expert index, as the reference does
            weights = weights.gather(-1, order)
        routed = expert_out[indices, tokens]  # (T, k, width)
        weights = weights.to(routed.dtype).unsqueeze(-1)
        if self.combine == "paper":
            total = (weights * routed).sum(1)
            if self.shared is not None:
                total = total + self.shared(x)
            return lorentz_normalize(total, self.curvature).reshape(shape)
        y = origin(self.width - 1, self.curvature, dtype=routed.dtype, device=x.device).expand(x.shape[0], -1)
        for slot in range(self.topk):  # a fixed trip count (the config's k), not data-dependent
            y = self.fold(y, routed[:, slot], weight=weights[:, slot])
        if self.shared is None:
            return y.reshape(shape)
        return self.shared_residual(self.shared(x), y).reshape(shape)
