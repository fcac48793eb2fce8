"""The Euclidean twin of MiCE: a DeepSeek-style MoE with SwiGLU experts and the same gate, dispatch and balancing.

``y = sum_k g_k E_{i_k}(x) + sum_shared S(x)``; routed experts are stacked SwiGLUs (no biases, PyTorch's default
``nn.Linear`` initialisation as :class:`~helmlm.nn.ffn.SwiGLU`), shared experts one SwiGLU of hidden width
``n_shared_experts * hidden``. Everything about routing lives in :mod:`helmlm.nn.routing`, shared with MiCE, so the
two differ only in geometry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.nn.ffn import SwiGLU
from helmlm.nn.routing import Dispatch, ExpertRoute, Gate, RoutedFFN, ScoreFunc, grouped_linear


class Experts(nn.Module):
    """``n_routed_experts`` SwiGLU experts with stacked weights ``w1, w3 (E, hidden, dim)`` and
    ``w2 (E, dim, hidden)``."""

    def __init__(self, n_routed_experts: int, dim: int, hidden: int):
        super().__init__()
        n = n_routed_experts
        self.n_routed_experts, self.dim, self.hidden = n, dim, hidden
        self.w1 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Per expert as ``nn.Linear``'s default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            w.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """All experts on all tokens: ``(T, dim) -> (E, T, dim)``."""
        xe = x.unsqueeze(0).expand(self.n_routed_experts, -1, -1)
        u = F.silu(torch.bmm(xe, self.w1.transpose(1, 2))) * torch.bmm(xe, self.w3.transpose(1, 2))
        return torch.bmm(u, self.w2.transpose(1, 2))

    def forward_rows(self, x: Tensor, route: ExpertRoute) -> Tensor:
        """Only the routed pairs: ``x (T, dim)``, rows sorted by expert -> ``(rows, dim)``."""
        w13 = torch.cat([self.w1, self.w3], dim=1)
        gate, up = grouped_linear(x.index_select(0, route.token), w13, route).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.w2, route)


class MoE(RoutedFFN):
    """DeepSeek-style mixture of experts on features ``(..., dim)``: :class:`Gate` on the whole feature vector,
    routed :class:`Experts`, shared SwiGLU experts. ``forward(x, valid=None)`` as :class:`~helmlm.nn.mice.MiCE`."""

    def __init__(self, dim: int, hidden: int, n_routed_experts: int, n_activated_experts: int,
                 n_shared_experts: int = 1, score_func: ScoreFunc = "softmax", route_scale: float = 1.0,
                 n_expert_groups: int = 1, n_limited_groups: int = 1, renormalize: bool = True,
                 dispatch: Dispatch = "auto", gate_init_gain: float = 1.0):
        super().__init__()
        self.dim, self.n_activated_experts = dim, n_activated_experts
        self.gate = Gate(dim, n_routed_experts, n_activated_experts, score_func, route_scale, n_expert_groups,
                         n_limited_groups, renormalize, gate_init_gain)
        self.experts = Experts(n_routed_experts, dim, hidden)
        self.shared = SwiGLU(dim, n_shared_experts * hidden) if n_shared_experts > 0 else None
        self._init_routing(n_routed_experts, dispatch)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        shape = x.shape
        weights, indices = self.route(x, valid)
        x = x.reshape(-1, self.dim)
        routed = self.routed_outputs(x, indices)
        y = (weights.to(routed.dtype).unsqueeze(-1) * routed).sum(1).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape)
