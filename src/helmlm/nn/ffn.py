"""Feed-forward blocks: the hyperbolic SwiGLU (HFFN) and the Euclidean SwiGLU twin."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift, time_from_space
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
        # - W2 acting on the lifted point (t, u) is W2[:, 1:] u + t W2[:, 0]: the time enters as a rank-1 term, so
        #   the lifted hidden point is never concatenated.
        # - Decoding (a few rows, UNPADDED_ROWS): no padding, whose weight copies would cost more than the products.
        w1, b1, w3, b3 = self.w1.weight, self.w1.bias, self.w3.weight, self.w3.bias
        w2_space = self.w2.weight[:, 1:]
        pad = 0 if x[..., 0].numel() <= UNPADDED_ROWS else gemm_pad(self.hidden - 1)
        if pad:
            w1, w3, w2_space = F.pad(w1, (0, 0, pad, 0)), F.pad(w3, (0, 0, pad, 0)), F.pad(w2_space, (pad, 0))
            b1, b3 = F.pad(b1, (pad, 0)), F.pad(b3, (pad, 0))
        u = F.silu(F.linear(x, w1, b1)) * F.linear(x, w3, b3)
        out = aligned_linear(u, w2_space, self.w2.bias) + time_from_space(u, c) * self.w2.weight[:, 0]
        return lift(out, c)


class SwiGLU(nn.Module):
    """LLaMA feed-forward: ``W2 (silu(W1 x) * W3 x)``, no biases; ``dim`` features in and out, ``hidden`` inside."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
