"""Hybrid decoders: HELM-D with one component taken from its Euclidean twin, or LLaMA with one taken from HELM-D.

The component-by-component study of docs/quality.md (issue 32) swaps one part at a time between the geometries:
``HELMConfig.swapped_components`` lists the parts built in the *other* geometry than ``config.geometry``, out of
:data:`COMPONENTS`:

- ``embedding``: the token table (a Lorentz table of points, trained by Riemannian Adam, or a Euclidean one);
- ``attention``: Lorentz MHA with HoPE, or Euclidean MHA with RoPE (same heads, same rotated width per head);
- ``ffn``: HFFN, or SwiGLU (the Euclidean hidden width is the Lorentz hidden point's space width);
- ``norm``: hyperbolic RMSNorm, or RMSNorm, in front of attention and FFN;
- ``residual``: the Lorentzian residual (weighted centroid, rescaled), or the plain sum;
- ``head``: the final LorentzLinear + hyperbolic RMSNorm + linear map of the full Lorentz vector, or RMSNorm +
  linear map.

Where the geometry changes between two parts, a value crosses at the origin: a Lorentz point ``x`` becomes the
tangent vector ``logmap0(x)`` (its ``ambient - 1`` features), a feature vector ``v`` becomes the point
``expmap0(v)``. The residual stream lives in the residual's geometry. Widths: the Euclidean parts work on
``E`` features and the Lorentz parts on ``E + 1`` ambient coordinates, with ``E = hidden_size - 1`` in a HELM-D
(``hidden_size`` is ambient there) and ``E = hidden_size`` in a LLaMA; every head has ``E / heads`` rotated
coordinates either way. Only the dense multi-head architectures (HELM-D and LLaMA) take swaps.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from helmlm.geometry import expmap0, logmap0
from helmlm.nn import (
    LorentzEmbedding,
    LorentzFeedForward,
    LorentzLinear,
    LorentzResidual,
    LorentzRMSNorm,
    LorentzSelfAttention,
    RMSNorm,
    SelfAttention,
    SwiGLU,
)

COMPONENTS = ("embedding", "attention", "ffn", "norm", "residual", "head")


def cross(x: Tensor, source: str, target: str, curvature: float) -> Tensor:
    """``x`` moved from geometry ``source`` to ``target`` at the origin: ``logmap0`` (lorentz -> euclidean),
    ``expmap0`` (euclidean -> lorentz), or ``x`` itself."""
    if source == target:
        return x
    return logmap0(x, curvature) if source == "lorentz" else expmap0(x, curvature)


def norm(geometry: str, width: int, eps: float, curvature: float) -> nn.Module:
    """RMSNorm over ``width`` features, or hyperbolic RMSNorm over ``width`` space coordinates."""
    return LorentzRMSNorm(width, eps, curvature) if geometry == "lorentz" else RMSNorm(width, eps)


class HybridBlock(nn.Module):
    """A pre-norm block whose norm, attention, FFN and residual each take their own geometry (``geometries``)."""

    def __init__(self, config, geometries: dict[str, str]):
        super().__init__()
        self.geometries = geometries
        width, c, eps = config.euclidean_width, config.curvature, config.rms_norm_eps
        self.curvature = c
        heads, head = config.num_attention_heads, config.head_space
        self.attn_norm = norm(geometries["norm"], width, eps, c)
        self.ffn_norm = norm(geometries["norm"], width, eps, c)
        if geometries["attention"] == "lorentz":
            self.attn = LorentzSelfAttention(width + 1, heads, c, config.attention_temperature or math.sqrt(width + 1),
                                             head_ambient=head + 1)
        else:
            self.attn = SelfAttention(width, heads, head_dim=head)
        hidden = config.euclidean_ffn_width
        self.ffn = (LorentzFeedForward(width + 1, hidden + 1, c) if geometries["ffn"] == "lorentz"
                    else SwiGLU(width, hidden))
        if geometries["residual"] == "lorentz":
            scale = config.residual_scale or 4.0 * math.sqrt(width + 1)
            self.attn_residual = LorentzResidual(scale=scale, curvature=c)
            self.ffn_residual = LorentzResidual(scale=scale, curvature=c)

    def _add(self, h: Tensor, y: Tensor, residual: nn.Module | None) -> Tensor:
        return residual(h, y) if self.geometries["residual"] == "lorentz" else h + y

    def _sublayer(self, h: Tensor, norm: nn.Module, layer: nn.Module, part: str, *args) -> Tensor:
        """``layer(norm(h))`` with every value crossing into the geometry of the part that reads it."""
        g, c = self.geometries, self.curvature
        x = norm(cross(h, g["residual"], g["norm"], c))
        y = layer(cross(x, g["norm"], g[part], c), *args)
        return cross(y, g[part], g["residual"], c)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, valid: Tensor | None = None,
                cache=None) -> Tensor:
        y = self._sublayer(h, self.attn_norm, self.attn, "attention", cos, sin, mask, cache)
        h = self._add(h, y, getattr(self, "attn_residual", None))
        y = self._sublayer(h, self.ffn_norm, self.ffn, "ffn")
        return self._add(h, y, getattr(self, "ffn_residual", None))


def hybrid_embedding(config, geometry: str) -> nn.Module:
    """The token table of a hybrid: Lorentz points of ``E`` space coordinates (stored as points, or as space parts
    with ``project_emb``), or ``E`` features."""
    width = config.euclidean_width
    if geometry == "lorentz":
        return LorentzEmbedding(config.vocab_size, width, config.curvature, manifold_table=not config.project_emb,
                                init_scale=config.embedding_init_scale)
    return nn.Embedding(config.vocab_size, width)


def hybrid_head(config, geometry: str) -> tuple[nn.Module | None, nn.Module]:
    """The final projection (Lorentz heads with ``final_projection``) and normalisation in front of a hybrid's LM
    head."""
    width, c = config.euclidean_width, config.curvature
    lorentz = geometry == "lorentz"
    final_proj = LorentzLinear(width + 1, width, curvature=c) if lorentz and config.final_projection else None
    return final_proj, norm(geometry, width, config.rms_norm_eps, c)
