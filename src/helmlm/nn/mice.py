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

Dispatch (:mod:`helmlm.nn.routing`) is synchronisation-free: the (token, expert) pairs are sorted by expert on the
device and each expert's HFFN runs as one grouped matmul over its rows. For fp64 (tests, parity) and where no grouped
kernel exists, every expert runs on every token and each token gathers its top-k outputs (exact, ``E / k`` times the
FLOPs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift, lorentz_normalize, origin, time_from_space
from helmlm.geometry.lorentz import _promote
from helmlm.nn.ffn import LorentzFeedForward
from helmlm.nn.residual import LorentzResidual
from helmlm.nn.routing import ExpertRoute, Gate, RoutedFFN, bias_weight, grouped_linear, with_bias_column

COMBINE_MODES = ("paper", "reference")
_LOG_C_LIMIT = 9.2


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

    def forward_rows(self, x: Tensor, route: ExpertRoute) -> Tensor:
        """Only the routed pairs: ``x (T, width)``, rows sorted by expert -> ``(rows, width)`` on the input manifold.

        The same function as :meth:`forward`, arranged so that almost all work is in two grouped GEMMs:
        - the per-expert scalings fold into the weights: with ``s = sqrt(c_i / c)``,
          ``W1 (s x) + b1 = (s W1) x + b1``, and returning by ``1 / s`` maps ``lift_{c_i}(y)`` to
          ``lift_c(y / s)``, so W2 and b2 are divided by ``s`` and the output is lifted with the base curvature;
        - biases ride in the GEMMs on an appended ones column (:func:`~helmlm.nn.routing.with_bias_column`), and
          W2 acts on the lifted hidden point ``[t, u, 1]`` directly, so no per-row bias or time term is gathered.
        """
        s = (self.curvatures.to(x.dtype) / self.curvature).sqrt()  # (E,)
        c_row = self.curvatures.to(x.dtype).index_select(0, route.expert).unsqueeze(-1)  # (rows, 1)
        # index_select, not x[idx]: its backward is index_add, ~5x faster on CPU than indexing's
        xs = with_bias_column(x).index_select(0, route.token)
        w13 = torch.cat([bias_weight(self.w1 * s.view(-1, 1, 1), self.b1, xs.shape[-1]),
                         bias_weight(self.w3 * s.view(-1, 1, 1), self.b3, xs.shape[-1])], dim=1)
        gate_up = grouped_linear(xs, w13, route)
        h = self.hidden - 1
        u = F.silu(gate_up[:, :h]) * gate_up[:, h: 2 * h]
        hidden = with_bias_column(u, time=time_from_space(u, c_row))
        w2 = bias_weight(self.w2 / s.view(-1, 1, 1), self.b2 / s.view(-1, 1), hidden.shape[-1])
        return lift(grouped_linear(hidden, w2, route), self.curvature)


class MiCE(RoutedFFN):
    """Mixture of curvature experts on Lorentz tokens ``(..., width)``; returns points on the input manifold.

    ``forward(x, valid=None)``: ``valid`` marks real tokens (False for padding), which alone count in the routing
    statistics and the balance loss (see :class:`~helmlm.nn.routing.RoutedFFN`).
    """

    def __init__(self, width: int, hidden: int, n_routed: int, topk: int, n_shared: int = 1,
                 curvatures: list[float] | None = None, learn_curvature: bool = True, score_func: str = "softmax",
                 route_scale: float = 1.0, n_groups: int = 1, topk_groups: int = 1, combine: str = "paper",
                 renormalize: bool | None = None, curvature: float = 1.0, dispatch: str = "auto"):
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
        self._init_routing(n_routed, dispatch)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        shape = x.shape
        weights, indices = self.route(x[..., 1:], valid)
        x = x.reshape(-1, self.width)
        if self.combine == "reference":
            indices, order = indices.sort(dim=-1)  # fold in ascending expert index, as the reference does
            weights = weights.gather(-1, order)
        routed = self.routed_outputs(x, indices)  # (T, k, width)
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
