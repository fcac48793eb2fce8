"""Token embeddings on the hyperboloid."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import expmap0, lift

try:  # geoopt trains a table of points (Riemannian Adam); inference, and a model directory's remote code, need none
    import geoopt
except ImportError:
    geoopt = None


def table_parameter(data: Tensor, curvature: float, requires_grad: bool = True) -> nn.Parameter:
    """A table of Lorentz points as a geoopt ``ManifoldParameter`` on ``Lorentz(k=c)`` (a plain ``Parameter``
    where geoopt is not installed: the same values, for inference)."""
    if geoopt is None:
        return nn.Parameter(data, requires_grad=requires_grad)
    return geoopt.ManifoldParameter(data, manifold=geoopt.Lorentz(k=curvature), requires_grad=requires_grad)


class LorentzEmbedding(nn.Module):
    """A table of Lorentz points, looked up by token id.

    ``manifold_table=True`` (HELM default): the table stores full points (time included) as a geoopt
    ``ManifoldParameter`` on ``Lorentz(k=c)``, to be trained with Riemannian Adam; initialised at geodesic radius 1
    around the origin in uniformly random directions. ``manifold_table=False`` (the reference's ``project_emb``):
    a Euclidean table of space parts, ``N(0, 1)`` initialised, lifted on lookup. ``init_scale`` replaces that
    radius, or that standard deviation (1 in the reference).
    """

    def __init__(self, num_embeddings: int, space_dim: int, curvature: float = 1.0, manifold_table: bool = True,
                 init_scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.space_dim, self.curvature = num_embeddings, space_dim, curvature
        self.init_scale = init_scale
        self.lookup_dtype: torch.dtype | None = None  # set by keep_table_in_float64: the dtype lookups return
        self.manifold_table = manifold_table
        if manifold_table:
            self.weight = table_parameter(torch.empty(num_embeddings, space_dim + 1), curvature)
        else:
            self.weight = nn.Parameter(torch.empty(num_embeddings, space_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.manifold_table:
            direction = F.normalize(torch.randn(self.num_embeddings, self.space_dim, dtype=torch.float64), dim=-1)
            self.weight.copy_(expmap0(self.init_scale * direction, self.curvature))
        else:
            nn.init.normal_(self.weight, std=self.init_scale)

    def restore_manifold_parameter(self) -> None:
        """Make ``weight`` a ``ManifoldParameter`` again if a loader replaced it by a plain ``Parameter`` (as
        ``transformers``' ``from_pretrained`` does), so Riemannian Adam keeps treating it on the manifold."""
        if self.manifold_table and geoopt is not None and not isinstance(self.weight, geoopt.ManifoldParameter):
            self.weight = table_parameter(self.weight.data, self.curvature, self.weight.requires_grad)

    def keep_table_in_float64(self) -> None:
        """Store the table (and so Riemannian Adam's state for it) in float64; lookups come back in the dtype the
        table had. For rows far from the origin: see docs/quality.md, "numerical limit"."""
        if self.weight.dtype != torch.float64:
            self.lookup_dtype = self.weight.dtype
            self.weight.data = self.weight.data.double()

    def forward(self, input_ids: Tensor) -> Tensor:
        emb = F.embedding(input_ids, self.weight)
        if self.lookup_dtype is not None:
            emb = emb.to(self.lookup_dtype)
        return emb if self.manifold_table else lift(emb, self.curvature)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, space_dim={self.space_dim}, manifold_table={self.manifold_table}"
