"""HELMConfig: one configuration for HELM models and their Euclidean twins."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

GEOMETRIES = ("lorentz", "euclidean")
ATTENTIONS = ("mha",)
FFNS = ("dense",)


class ConfigError(ValueError):
    """An inconsistent or invalid model configuration; the message names the field and what to do."""


class HELMConfig(PretrainedConfig):
    """Configuration of a HELM decoder (a ``transformers.PretrainedConfig``, so it saves as ``config.json``).

    A block is assembled from the choices ``geometry`` (``lorentz`` | ``euclidean``), ``attention`` (``mha``) and
    ``ffn`` (``dense``), so a Euclidean baseline differs from its hyperbolic twin only in geometry.

    Widths: for ``geometry="lorentz"``, ``hidden_size`` is the *ambient* width ``W`` of the residual stream
    (``W - 1`` space coordinates plus time, the reference's ``W`` of ``L6_W390_A6``) and ``intermediate_size`` the
    ambient width of the FFN's hidden point; each attention head has ``W / heads`` ambient coordinates, of which
    ``W / heads - 1`` are rotated by HoPE. For ``geometry="euclidean"`` both are ordinary feature widths.

    Defaults that depend on the width are resolved at model build when left ``None``: ``residual_scale``
    (Lorentzian residual space multiplier; ``4 sqrt(W)`` as in HELM-D) and ``attention_temperature`` (initial
    score divisor ``tau``; ``sqrt(W)``).
    """

    model_type = "helm"

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 130,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 256,
        geometry: str = "lorentz",
        attention: str = "mha",
        ffn: str = "dense",
        curvature: float = 1.0,
        rope_theta: float = 10000.0,
        residual_scale: float | None = None,
        attention_temperature: float | None = None,
        rms_norm_eps: float = 1e-8,
        project_emb: bool = False,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.geometry = geometry
        self.attention = attention
        self.ffn = ffn
        self.curvature = curvature
        self.rope_theta = rope_theta
        self.residual_scale = residual_scale
        self.attention_temperature = attention_temperature
        self.rms_norm_eps = rms_norm_eps
        self.project_emb = project_emb
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def is_lorentz(self) -> bool:
        return self.geometry == "lorentz"

    @property
    def head_dim(self) -> int:
        """Per-head width: ambient coordinates for Lorentz heads, features for Euclidean heads.

        (Defined for any head count, because transformers probes it inside ``__init__``; ``validate`` rejects
        non-positive head counts with a message naming the field.)"""
        heads = self.num_attention_heads
        return self.hidden_size // heads if isinstance(heads, int) and heads > 0 else 0

    @property
    def rotary_dim(self) -> int:
        """Coordinates rotated by (Ho)PE per head: the head's space part (Lorentz) or the whole head."""
        return self.head_dim - 1 if self.is_lorentz else self.head_dim

    def resolved_residual_scale(self) -> float | None:
        if not self.is_lorentz:
            return None
        return 4.0 * math.sqrt(self.hidden_size) if self.residual_scale is None else self.residual_scale

    def resolved_attention_temperature(self) -> float:
        return math.sqrt(self.hidden_size) if self.attention_temperature is None else self.attention_temperature

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field and how to fix it."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            positive_int(name)
        for name, allowed in (("geometry", GEOMETRIES), ("attention", ATTENTIONS), ("ffn", FFNS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.curvature <= 0:
            raise ConfigError(f"curvature must be > 0 (sectional curvature -1/c), got {self.curvature}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "every head gets hidden_size / num_attention_heads coordinates")
        if self.rotary_dim % 2:
            what = (f"each head has {self.head_dim} ambient coordinates, so its space part (rotated by HoPE) has "
                    f"{self.rotary_dim}" if self.is_lorentz
                    else f"each head has {self.rotary_dim} coordinates")
            raise ConfigError(
                f"rotary dim {self.rotary_dim} is odd ({what}, with hidden_size={self.hidden_size} and "
                f"num_attention_heads={self.num_attention_heads}); rotary embeddings rotate coordinate pairs, so "
                "choose a width/head count whose rotated dim is even")
        if self.is_lorentz and self.intermediate_size < 2:
            raise ConfigError(f"intermediate_size must be >= 2 for a Lorentz FFN, got {self.intermediate_size}")
        if self.project_emb and not self.is_lorentz:
            raise ConfigError("project_emb only applies to geometry='lorentz'")
        if self.residual_scale is not None and self.residual_scale <= 0:
            raise ConfigError(f"residual_scale must be > 0 or null, got {self.residual_scale}")
        if self.attention_temperature is not None and self.attention_temperature <= 0:
            raise ConfigError(f"attention_temperature must be > 0 or null, got {self.attention_temperature}")

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "HELMConfig":
        """Load a preset from ``configs/*.yaml`` (its ``model:`` section, or the whole file), with overrides."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        data = data.get("model", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of model fields (optionally under 'model:'), "
                              f"got {type(data).__name__}")
        data = dict(data)
        known = set(cls().to_dict())
        unknown = sorted(set(data) - known - {"name"})
        if unknown:
            import difflib

            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"{path}: unknown model keys {', '.join(hints)}")
        data.pop("name", None)
        data.update(overrides)
        config = cls(**data)
        config.validate()
        return config


PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def available_presets() -> list[str]:
    """Names of the presets shipped with helmlm (``configs/*.yaml`` in a checkout)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, **overrides: Any) -> HELMConfig:
    """A :class:`HELMConfig` from a YAML path or a preset name (e.g. ``helm_d_tiny``), with field overrides."""
    path = Path(name_or_path)
    if not path.is_file():
        preset = PRESETS_DIR / f"{path.stem if path.suffix == '.yaml' else name_or_path}.yaml"
        if not preset.is_file():
            raise FileNotFoundError(
                f"no config file or preset named {str(name_or_path)!r}; presets: {', '.join(available_presets())}")
        path = preset
    return HELMConfig.from_yaml(path, **overrides)
