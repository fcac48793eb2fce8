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

``COMBINE_MODES`` is defined here, the lowest module that uses it, and ``models/config.py`` imports it (the rule of
:mod:`helmlm.nn.routing`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift, lorentz_normalize, origin, promote
from helmlm.nn.ffn import LorentzFeedForward, swiglu_lift
from helmlm.nn.linear import gemm_pad, lorentz_init_
from helmlm.nn.residual import LorentzResidual
from helmlm.nn.routing import (
    Dispatch,
    ExpertRoute,
    Gate,
    RoutedFFN,
    ScoreFunc,
    bias_weight,
    grouped_linear,
    with_bias_column,
)

Combine = Literal["paper", "reference"]
COMBINE_MODES: tuple[str, ...] = get_args(Combine)
_LOG_C_LIMIT = 9.2


class LorentzExperts(nn.Module):
    """``n_routed_experts`` HFFN experts (on points of ``ambient`` coordinates, ``hidden`` ambient coordinates
    inside) with stacked weights, each on its own curvature ``c_i = exp(log_curvature_i)``."""

    def __init__(self, n_routed_experts: int, ambient: int, hidden: int, curvatures: list[float],
                 learn_curvature: bool = True, curvature: float = 1.0):
        super().__init__()
        n = n_routed_experts
        if len(curvatures) != n or min(curvatures) <= 0:
            raise ValueError(f"need {n} positive expert curvatures, got {curvatures}")
        self.n_routed_experts, self.ambient, self.hidden, self.curvature = n, ambient, hidden, curvature
        self.w1 = nn.Parameter(torch.empty(n, hidden - 1, ambient))
        self.b1 = nn.Parameter(torch.empty(n, hidden - 1))
        self.w3 = nn.Parameter(torch.empty(n, hidden - 1, ambient))
        self.b3 = nn.Parameter(torch.empty(n, hidden - 1))
        self.w2 = nn.Parameter(torch.empty(n, ambient - 1, hidden))
        self.b2 = nn.Parameter(torch.empty(n, ambient - 1))
        self.init_curvatures = list(curvatures)
        self.log_curvature = nn.Parameter(torch.empty(n), requires_grad=learn_curvature)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Per expert as LorentzLinear (:func:`~helmlm.nn.linear.lorentz_init_`), zero biases; curvatures at their
        init."""
        for w in (self.w1, self.w3, self.w2):
            lorentz_init_(w)
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
        """All experts on all tokens: ``x (T, ambient)`` on the input manifold -> ``(E, T, ambient)`` on it too."""
        c_e = self.curvatures.to(promote(x).dtype).view(-1, 1, 1)
        to_expert = (c_e / self.curvature).sqrt()
        xe = x.unsqueeze(0) * to_expert
        gate = torch.baddbmm(self.b1.unsqueeze(1), xe, self.w1.transpose(1, 2))
        up = torch.baddbmm(self.b3.unsqueeze(1), xe, self.w3.transpose(1, 2))
        hidden = lift(F.silu(gate) * up, c_e)
        out = torch.baddbmm(self.b2.unsqueeze(1), hidden, self.w2.transpose(1, 2))
        return lift(out, c_e) / to_expert

    def forward_rows(self, x: Tensor, route: ExpertRoute) -> Tensor:
        """Only the routed pairs: ``x (T, ambient)``, rows sorted by expert -> ``(rows, ambient)`` on the input
        manifold.

        The same function as :meth:`forward`, arranged so that almost all work is in grouped GEMMs:
        - the per-expert scalings fold into the weights: with ``s = sqrt(c_i / c)``,
          ``W1 (s x) + b1 = (s W1) x + b1``, and returning by ``1 / s`` maps ``lift_{c_i}(y)`` to
          ``lift_c(y / s)``, so W2 and b2 are divided by ``s`` and the output is lifted with the base curvature;
        - biases ride in the GEMMs on a ones column (:func:`~helmlm.nn.routing.with_bias_column`);
        - W1 and W3 get zero rows up to an aligned width with room for two more columns, into which
          :func:`~helmlm.nn.ffn.swiglu_lift` writes the hidden point's time and a ones column: the lifted hidden
          point ``[u, t, 1, 0]`` is built in one buffer, on which W2 (its columns reordered to match, the bias
          last) acts directly: no concatenation, no per-row bias or time term gathered.
        """
        s = (self.curvatures.to(x.dtype) / self.curvature).sqrt()  # (E,)
        c_row = self.curvatures.to(x.dtype).index_select(0, route.expert).unsqueeze(-1)  # (rows, 1)
        # index_select, not x[idx]: its backward is index_add, much faster on CPU than indexing's (docs/LOG.md)
        xs = with_bias_column(x).index_select(0, route.token)
        h = self.hidden - 1
        width = h + 2 + gemm_pad(h + 2)
        g, v = (grouped_linear(xs, F.pad(bias_weight(w * s.view(-1, 1, 1), b, xs.shape[-1]), (0, 0, 0, width - h)),
                               route) for w, b in ((self.w1, self.b1), (self.w3, self.b3)))
        hidden = swiglu_lift(g, v, c_row, time_col=h, ones_col=h + 1)
        w2 = torch.cat([self.w2[..., 1:], self.w2[..., :1], self.b2.unsqueeze(-1)], dim=-1) / s.view(-1, 1, 1)
        w2 = F.pad(w2, (0, width - w2.shape[-1]))
        return lift(grouped_linear(hidden, w2, route), self.curvature)


class MiCE(RoutedFFN):
    """Mixture of curvature experts on Lorentz tokens ``(..., ambient)``; returns points on the input manifold.

    ``forward(x, valid=None)``: ``valid`` marks real tokens (False for padding), which alone count in the routing
    statistics and the balance loss (see :class:`~helmlm.nn.routing.RoutedFFN`).
    """

    def __init__(self, ambient: int, hidden: int, n_routed_experts: int, n_activated_experts: int,
                 n_shared_experts: int = 1, curvatures: list[float] | None = None, learn_curvature: bool = True,
                 score_func: ScoreFunc = "softmax", route_scale: float = 1.0, n_expert_groups: int = 1,
                 n_limited_groups: int = 1, combine: Combine = "paper", renormalize: bool | None = None,
                 curvature: float = 1.0, dispatch: Dispatch = "auto", gate_init_gain: float = 1.0):
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.ambient, self.combine, self.curvature = ambient, combine, curvature
        self.n_activated_experts = n_activated_experts
        if renormalize is None:  # the paper renormalises; the reference only does for sigmoid scores
            renormalize = combine == "paper" or score_func == "sigmoid"
        if curvatures is None:
            curvatures = [1.0] * n_routed_experts
        self.gate = Gate(ambient - 1, n_routed_experts, n_activated_experts, score_func, route_scale, n_expert_groups,
                         n_limited_groups, renormalize, gate_init_gain)
        self.experts = LorentzExperts(n_routed_experts, ambient, hidden, curvatures, learn_curvature, curvature)
        self.shared = (LorentzFeedForward(ambient, n_shared_experts * hidden, curvature) if n_shared_experts > 0
                       else None)
        if combine == "reference":
            self.fold = LorentzResidual(weight=1.0, scale=2.0, curvature=curvature)
            self.shared_residual = LorentzResidual(scale=2.0, learn_scale=True, curvature=curvature)
        self._init_routing(n_routed_experts, dispatch)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        shape = x.shape
        weights, indices = self.route(x[..., 1:], valid)
        x = x.reshape(-1, self.ambient)
        if self.combine == "reference":
            indices, order = indices.sort(dim=-1)  # fold in ascending expert index, as the reference does
            weights = weights.gather(-1, order)
        routed = self.routed_outputs(x, indices)  # (T, k, ambient)
        weights = weights.to(routed.dtype).unsqueeze(-1)
        if self.combine == "paper":
            total = (weights * routed).sum(1)
            if self.shared is not None:
                total = total + self.shared(x)
            return lorentz_normalize(total, self.curvature).reshape(shape)
        y = origin(self.ambient - 1, self.curvature, dtype=routed.dtype, device=x.device).expand(x.shape[0], -1)
        for slot in range(self.n_activated_experts):  # a fixed trip count (the config's k), not data-dependent
            y = self.fold(y, routed[:, slot], weight=weights[:, slot])
        if self.shared is None:
            return y.reshape(shape)
        return self.shared_residual(self.shared(x), y).reshape(shape)
