"""Feed-forward blocks: the hyperbolic SwiGLU (HFFN) and the Euclidean SwiGLU twin."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift
from helmlm.nn.linear import LorentzLinear


class LorentzFeedForward(nn.Module):
    """HFFN: ``u = silu(W1 x + b1) * (W3 x + b3)`` (space only), ``lift(u)``, then LorentzLinear ``W2``.

    ``width`` is the ambient dim of input and output, ``hidden`` the ambient dim of the lifted hidden point
    (``hidden - 1`` space coordinates). A per-call ``curvature`` runs the whole block on another hyperboloid
    (MiCE experts).
    """

    def __init__(self, width: int, hidden: int, curvature: float = 1.0):
        super().__init__()
        self.width, self.hidden, self.curvature = width, hidden, curvature
        self.w1 = LorentzLinear(width, hidden - 1, curvature=curvature)
        self.w3 = LorentzLinear(width, hidden - 1, curvature=curvature)
        self.w2 = LorentzLinear(hidden, width - 1, curvature=curvature)

    def forward(self, x: Tensor, *, curvature=None) -> Tensor:
        c = self.curvature if curvature is None else curvature
        u = F.silu(self.w1(x, return_space=True)) * self.w3(x, return_space=True)
        return self.w2(lift(u, c), curvature=c)


class SwiGLU(nn.Module):
    """LLaMA feed-forward: ``W2 (silu(W1 x) * W3 x)``, no biases."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
