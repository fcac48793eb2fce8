"""The Euclidean twin of MiCE: a DeepSeek-style MoE with SwiGLU experts and the same gate, dispatch and balancing.

``y = sum_k g_k E_{i_k}(x) + sum_shared S(x)``; routed experts are stacked SwiGLUs (no biases, PyTorch's default
``nn.Linear`` initialisation as :class:`~helmlm.nn.ffn.SwiGLU`), shared experts one SwiGLU of width
``n_shared * hidden``. Everything about routing lives in :mod:`helmlm.nn.routing`, shared with MiCE, so the two
differ only in geometry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.nn.ffn import SwiGLU
from helmlm.nn.routing import ExpertRoute, Gate, RoutedFFN, grouped_linear


class Experts(nn.Module):
    """``n`` SwiGLU experts with stacked weights ``w1, w3 (n, hidden, width)`` and ``w2 (n, width, hidden)``."""

    def __init__(self, n: int, width: int, hidden: int):
        super().__init__()
        self.n, self.width, self.hidden = n, width, hidden
        self.w1 = nn.Parameter(torch.empty(n, hidden, width))
        self.w3 = nn.Parameter(torch.empty(n, hidden, width))
        self.w2 = nn.Parameter(torch.empty(n, width, hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Per expert as ``nn.Linear``'s default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            w.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """All experts on all tokens: ``(T, width) -> (n, T, width)``."""
        xe = x.unsqueeze(0).expand(self.n, -1, -1)
        u = F.silu(torch.bmm(xe, self.w1.transpose(1, 2))) * torch.bmm(xe, self.w3.transpose(1, 2))
        return torch.bmm(u, self.w2.transpose(1, 2))

    def forward_rows(self, x: Tensor, route: ExpertRoute) -> Tensor:
        """Only the routed pairs: ``x (T, width)``, rows sorted by expert -> ``(rows, width)``."""
        gate, up = grouped_linear(x.index_select(0, route.token), torch.cat([self.w1, self.w3], dim=1), route).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.w2, route)


class MoE(RoutedFFN):
    """DeepSeek-style mixture of experts on features ``(..., width)``: :class:`Gate` on the whole feature vector,
    routed :class:`Experts`, shared SwiGLU experts. ``forward(x, valid=None)`` as :class:`~helmlm.nn.mice.MiCE`."""

    def __init__(self, width: int, hidden: int, n_routed: int, topk: int, n_shared: int = 1,
                 score_func: str = "softmax", route_scale: float = 1.0, n_groups: int = 1, topk_groups: int = 1,
                 renormalize: bool = True, dispatch: str = "auto"):
        super().__init__()
        self.width, self.topk = width, topk
        self.gate = Gate(width, n_routed, topk, score_func, route_scale, n_groups, topk_groups, renormalize)
        self.experts = Experts(n_routed, width, hidden)
        self.shared = SwiGLU(width, n_shared * hidden) if n_shared > 0 else None
        self._init_routing(n_routed, dispatch)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        shape = x.shape
        weights, indices = self.route(x, valid)
        x = x.reshape(-1, self.width)
        routed = self.routed_outputs(x, indices)
        y = (weights.to(routed.dtype).unsqueeze(-1) * routed).sum(1).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape)
