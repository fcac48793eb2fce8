"""HELMConfig: one configuration for HELM models and their Euclidean twins."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from helmlm.errors import ConfigError, did_you_mean  # noqa: F401  (ConfigError re-exported)
from helmlm.nn.latent_attention import MLA_INITS
from helmlm.nn.mice import COMBINE_MODES, Combine
from helmlm.nn.routing import DISPATCHES, SCORE_FUNCS, Dispatch, ScoreFunc

# Choices of the block's structure, which only the config knows; the routing choices (SCORE_FUNCS, DISPATCHES,
# COMBINE_MODES) are defined once by the layers that use them, in helmlm.nn, and imported here.
GEOMETRIES = ("lorentz", "euclidean")
ATTENTIONS = ("mha", "mla")
FFNS = ("dense", "moe")


# The model format a HELMConfig writes (``helmlm_format`` in config.json) and the newest it reads. Raise it when a
# saved model's weights or config change meaning; older formats must keep loading.
HELMLM_FORMAT = 1


def _checked_format(saved_format: int) -> int:
    """The format a loaded config is saved in again (the current one); one written in a newer format than this code
    reads is refused, saying what to do."""
    if saved_format > HELMLM_FORMAT:
        raise ConfigError(f"this model was saved in helmlm's model format {saved_format}, and this code reads "
                          f"formats up to {HELMLM_FORMAT}. In a model directory, its remote code (modeling_helm.py "
                          "and helmlm_*.py) is older than its weights: export the model again with a current "
                          "helmlm, or install a current helmlm (pip install -U helmlm) and load it after "
                          "`import helmlm`")
    return HELMLM_FORMAT


class HELMConfig(PretrainedConfig):
    """Configuration of a HELM decoder (a ``transformers.PretrainedConfig``, so it saves as ``config.json``).

    A block is assembled from the choices ``geometry`` (``lorentz`` | ``euclidean``), ``attention`` (``mha`` |
    ``mla``) and ``ffn`` (``dense`` | ``moe``), so a Euclidean baseline differs from its hyperbolic twin only in
    geometry: HELM-D <-> LLaMA (``mha`` + ``dense``), HELM-MiCE <-> DeepSeek-V3 style (``mla`` + ``moe``).

    Widths: for ``geometry="lorentz"``, ``hidden_size`` is the *ambient* width ``W`` of the residual stream
    (``W - 1`` space coordinates plus time, the reference's ``W`` of ``L6_W390_A6``) and ``intermediate_size`` the
    ambient width of the FFN's hidden point; each attention head has ``W / heads`` ambient coordinates, of which
    ``W / heads - 1`` are rotated by HoPE. For ``geometry="euclidean"`` both are ordinary feature widths.

    Initial scales (for the ablations of docs/quality.md; the defaults are the reference's): ``embedding_init_scale``
    is the Lorentz table's geodesic radius (the std of the ``project_emb`` table); ``head_init_std`` draws the head
    from ``N(0, std^2)`` (``None``: PyTorch's default ``nn.Linear`` init); ``gate_init_gain`` multiplies the MoE
    router's Xavier gain, hence its initial logits. The twins' embedding table stays at ``initializer_range``.

    ``final_projection`` (Lorentz models): the reference's LorentzLinear ``W -> W - 1`` between the last block and
    the final norm. Without it the final norm reads the last point's space part, so the LM head sees the same
    normalised direction as through ``logmap0`` (the twin has no such layer; docs/quality.md, section 4). It has no
    effect where the head is Euclidean.

    Defaults that depend on the width are resolved at model build when left ``None``: ``residual_scale``
    (Lorentzian residual space multiplier; ``4 sqrt(W)`` as in HELM-D) and ``attention_temperature`` (initial
    score divisor ``tau``; ``sqrt(W)``).

    MLA dims (``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``) count ambient
    coordinates for ``lorentz`` (as the reference; the rotary part has ``qk_rope_head_dim - 1`` space coordinates)
    and features for ``euclidean``. MoE: the first ``n_dense_layers`` blocks keep a dense FFN; routed layers add
    ``moe_balance_alpha`` times their sequence-level balance loss to the training loss; ``moe_dispatch`` picks
    grouped (sparse) or dense expert computation (``auto``: grouped where a kernel exists, dense for fp64).
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
        embedding_init_scale: float = 1.0,
        head_init_std: float | None = None,
        gate_init_gain: float = 1.0,
        final_projection: bool = True,
        tie_word_embeddings: bool = False,
        # attention="mla" (HMLA): ambient dims per head, as in the reference
        kv_lora_rank: int = 16,
        qk_nope_head_dim: int = 17,
        qk_rope_head_dim: int = 17,
        v_head_dim: int = 17,
        mla_init: str = "xavier",
        # ffn="moe" (MiCE): the first n_dense_layers blocks keep a dense FFN
        n_dense_layers: int = 1,
        n_routed_experts: int = 4,
        n_activated_experts: int = 2,
        n_shared_experts: int = 1,
        moe_intermediate_size: int | None = None,
        score_func: ScoreFunc = "softmax",
        route_scale: float = 1.0,
        n_expert_groups: int = 1,
        n_limited_groups: int = 1,
        expert_curvatures: list[float] | None = None,
        learn_expert_curvature: bool = True,
        moe_combine: Combine = "paper",
        moe_renormalize: bool | None = None,
        moe_balance_alpha: float = 1e-4,
        moe_dispatch: Dispatch = "auto",
        # hybrids (helmlm.models.hybrid): components built in the other geometry
        swapped_components: list[str] | None = None,
        **kwargs: Any,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.geometry, self.attention, self.ffn = geometry, attention, ffn  # the block's three choices
        self.curvature, self.rope_theta, self.rms_norm_eps = curvature, rope_theta, rms_norm_eps
        self.residual_scale, self.attention_temperature = residual_scale, attention_temperature
        self.project_emb, self.initializer_range = project_emb, initializer_range
        self.embedding_init_scale, self.head_init_std, self.gate_init_gain = (embedding_init_scale, head_init_std,
                                                                              gate_init_gain)
        self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
        self.mla_init = mla_init
        self.final_projection = final_projection
        self.n_dense_layers = n_dense_layers
        self.n_routed_experts = n_routed_experts
        self.n_activated_experts = n_activated_experts
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = (self.intermediate_size // 2 if moe_intermediate_size is None
                                      else moe_intermediate_size)
        self.score_func = score_func
        self.route_scale = route_scale
        self.n_expert_groups, self.n_limited_groups = n_expert_groups, n_limited_groups
        self.expert_curvatures = None if expert_curvatures is None else [float(c) for c in expert_curvatures]
        self.learn_expert_curvature = learn_expert_curvature
        self.moe_combine, self.moe_renormalize = moe_combine, moe_renormalize
        self.moe_balance_alpha, self.moe_dispatch = moe_balance_alpha, moe_dispatch
        self.swapped_components = list(swapped_components) if swapped_components else []
        self.helmlm_format = _checked_format(kwargs.pop("helmlm_format", HELMLM_FORMAT))  # saved: the current one
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
    def euclidean_width(self) -> int:
        """Features of a Euclidean part: ``hidden_size`` (a Euclidean model), or the space width ``hidden_size - 1``
        (a Lorentz model, where ``hidden_size`` is ambient). A Lorentz part has one more coordinate."""
        return self.hidden_size - 1 if self.is_lorentz else self.hidden_size

    @property
    def head_space(self) -> int:
        """Rotated coordinates per attention head (MHA): the head's space width, or its features."""
        return self.head_dim - 1 if self.is_lorentz else self.head_dim

    @property
    def euclidean_ffn_width(self) -> int:
        """The FFN's hidden features in Euclidean form (a Lorentz FFN's hidden point has one more coordinate)."""
        return self.intermediate_size - 1 if self.is_lorentz else self.intermediate_size

    def component_geometry(self, component: str) -> str:
        """The geometry of one part (:data:`helmlm.models.hybrid.COMPONENTS`): the model's, or the other one if the
        part is in ``swapped_components``."""
        if component not in self.swapped_components:
            return self.geometry
        return "euclidean" if self.is_lorentz else "lorentz"

    @property
    def hidden_out(self) -> int:
        """Width of the last hidden states, which the LM head reads: ``hidden_size`` unless a hybrid's head takes
        the other geometry (then one coordinate more or fewer)."""
        if not self.swapped_components:
            return self.hidden_size
        return self.euclidean_width + (1 if self.component_geometry("head") == "lorentz" else 0)

    @property
    def rotary_dim(self) -> int:
        """Coordinates rotated by (Ho)PE per head: the head's space part (Lorentz MHA), the decoupled rotary key's
        space part (HMLA: ``qk_rope_head_dim - 1``), or the whole head (Euclidean MHA)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim - 1 if self.is_lorentz else self.qk_rope_head_dim
        return self.head_dim - 1 if self.is_lorentz else self.head_dim

    def kv_cache_floats_per_token(self) -> int:
        """Numbers one token adds to the KV cache, summed over layers (see :mod:`helmlm.nn.cache`): keys and values
        of every head for MHA (``2 x hidden_size``: Lorentz heads keep their time coordinate); for HMLA the latent
        point, the shared rotary key and the per-head time coordinates of k and v (``kv_lora_rank + 1 +
        qk_rope_head_dim - 1 + 2 H``); for the Euclidean MLA the latent and the rotary key."""
        if self.swapped_components:
            lorentz_heads = self.component_geometry("attention") == "lorentz"
            return self.num_hidden_layers * 2 * self.num_attention_heads * (self.head_space + lorentz_heads)
        if self.attention == "mla":
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim + (2 * self.num_attention_heads if self.is_lorentz
                                                                     else 0)
        else:
            per_layer = 2 * self.num_attention_heads * self.head_dim
        return self.num_hidden_layers * per_layer

    def resolved_residual_scale(self) -> float | None:
        """Lorentzian residual space multiplier: ``4 sqrt(W)`` for HELM-D (MHA), ``sqrt(W)`` for HELM-MiCE (MLA)."""
        if not self.is_lorentz:
            return None
        if self.residual_scale is not None:
            return self.residual_scale
        return (4.0 if self.attention == "mha" else 1.0) * math.sqrt(self.hidden_size)

    def resolved_attention_temperature(self) -> float:
        """Initial score divisor: ``sqrt(W)`` (MHA), ``sqrt(heads * (nope + rope))`` (MLA), as in the reference."""
        if self.attention_temperature is not None:
            return self.attention_temperature
        if self.attention == "mla":
            return math.sqrt(self.num_attention_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim))
        return math.sqrt(self.hidden_size)

    def resolved_expert_curvatures(self) -> list[float]:
        """Initial curvature of each routed expert: the configured list, else evenly spaced in [0.1, 2.0] (the
        reference's intended, unused list)."""
        if self.expert_curvatures is not None:
            return list(self.expert_curvatures)
        n = self.n_routed_experts
        return [0.1 + 1.9 * i / (n - 1) for i in range(n)] if n > 1 else [1.0]

    def resolved_moe_renormalize(self) -> bool:
        """Renormalise the selected routing weights to sum 1: the configured value, else as the combination mode
        implies (the paper and the Euclidean twin renormalise; the reference only for sigmoid scores)."""
        if self.moe_renormalize is not None:
            return bool(self.moe_renormalize)
        return not self.is_lorentz or self.moe_combine == "paper" or self.score_func == "sigmoid"

    def is_moe_layer(self, index: int) -> bool:
        return self.ffn == "moe" and index >= self.n_dense_layers

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field and how to fix it.

        The checks run in a fixed order (sizes and choices, MLA dims, MoE settings, heads and rotary dims, the
        remaining scalars), so the field named is always the first one that is wrong in that order."""
        self._validate_basics()
        if self.attention == "mla":
            self._validate_mla()
        if self.ffn == "moe":
            self._validate_moe_counts()
            self._validate_moe_choices()
        self._validate_heads()
        self._validate_scalars()
        if self.swapped_components:
            self._validate_swaps()

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def _non_negative_int(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")

    def _one_of(self, name: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def _validate_basics(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            self._positive_int(name)
        for name, allowed in (("geometry", GEOMETRIES), ("attention", ATTENTIONS), ("ffn", FFNS)):
            self._one_of(name, allowed)
        if self.curvature <= 0:
            raise ConfigError(f"curvature must be > 0 (sectional curvature -1/c), got {self.curvature}")

    def _validate_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            self._positive_int(name)
        self._one_of("mla_init", MLA_INITS)
        if self.is_lorentz and (self.qk_rope_head_dim < 3 or self.v_head_dim < 2):
            raise ConfigError(f"qk_rope_head_dim must be >= 3 and v_head_dim >= 2 (ambient coordinates, one "
                              f"is time); got {self.qk_rope_head_dim} and {self.v_head_dim}")

    def _validate_moe_counts(self) -> None:
        for name in ("n_routed_experts", "n_activated_experts", "moe_intermediate_size",
                     "n_expert_groups", "n_limited_groups"):
            self._positive_int(name)
        self._non_negative_int("n_shared_experts")
        self._non_negative_int("n_dense_layers")
        routed, active, groups, limited = (self.n_routed_experts, self.n_activated_experts, self.n_expert_groups,
                                           self.n_limited_groups)
        if active > routed:
            raise ConfigError(f"n_activated_experts={active} (top-k) exceeds n_routed_experts={routed}")
        if routed % groups:
            raise ConfigError(f"n_routed_experts={routed} is not divisible by n_expert_groups={groups}")
        if limited > groups:
            raise ConfigError(f"n_limited_groups={limited} exceeds n_expert_groups={groups}")
        if groups > 1 and (routed // groups) * limited < active:
            raise ConfigError(f"n_limited_groups={limited} groups of {routed // groups} experts cannot hold "
                              f"n_activated_experts={active}")

    def _validate_moe_choices(self) -> None:
        self._one_of("score_func", SCORE_FUNCS)
        self._one_of("moe_dispatch", DISPATCHES)
        if not isinstance(self.moe_balance_alpha, (int, float)) or self.moe_balance_alpha < 0:
            raise ConfigError(f"moe_balance_alpha must be a number >= 0, got {self.moe_balance_alpha!r}")
        if self.is_lorentz and self.moe_intermediate_size < 2:
            raise ConfigError(f"moe_intermediate_size must be >= 2 for Lorentz experts (ambient width, one "
                              f"coordinate is time), got {self.moe_intermediate_size}")
        self._one_of("moe_combine", COMBINE_MODES)
        curv = self.resolved_expert_curvatures()
        if len(curv) != self.n_routed_experts or min(curv) <= 0:
            raise ConfigError(f"expert_curvatures must list {self.n_routed_experts} positive values, got {curv}")

    def _validate_heads(self) -> None:
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.attention == "mha" and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "every head gets hidden_size / num_attention_heads coordinates")
        if self.rotary_dim % 2:
            raise ConfigError(self._odd_rotary_message())

    def _odd_rotary_message(self) -> str:
        fix = "choose a width/head count whose rotated dim is even"
        if self.attention == "mla" and self.is_lorentz:
            what = (f"qk_rope_head_dim={self.qk_rope_head_dim} ambient coordinates, so the rotary key's space "
                    f"part has {self.rotary_dim}")
            fix = "choose an odd qk_rope_head_dim"
        elif self.attention == "mla":
            what, fix = f"qk_rope_head_dim={self.qk_rope_head_dim}", "choose an even qk_rope_head_dim"
        elif self.is_lorentz:
            what = (f"each head has {self.head_dim} ambient coordinates, so its space part (rotated by HoPE) "
                    f"has {self.rotary_dim}")
        else:
            what = f"each head has {self.rotary_dim} coordinates"
        return (f"rotary dim {self.rotary_dim} is odd ({what}, with hidden_size={self.hidden_size} and "
                f"num_attention_heads={self.num_attention_heads}); rotary embeddings rotate coordinate pairs, so "
                + fix)

    def _validate_scalars(self) -> None:
        if self.is_lorentz and self.intermediate_size < 2:
            raise ConfigError(f"intermediate_size must be >= 2 for a Lorentz FFN, got {self.intermediate_size}")
        if self.project_emb and self.component_geometry("embedding") != "lorentz":
            raise ConfigError("project_emb only applies to a Lorentz token table (geometry='lorentz', or a Euclidean "
                              "model with swapped_components=[embedding])"
                              + (": with the embedding swapped, the table is the twin's (set project_emb=false)"
                                 if self.is_lorentz else ""))
        if self.residual_scale is not None and self.residual_scale <= 0:
            raise ConfigError(f"residual_scale must be > 0 or null, got {self.residual_scale}")
        if self.attention_temperature is not None and self.attention_temperature <= 0:
            raise ConfigError(f"attention_temperature must be > 0 or null, got {self.attention_temperature}")
        for name in ("embedding_init_scale", "gate_init_gain", "head_init_std"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a number > 0{' or null' if name == 'head_init_std' else ''}, "
                                  f"got {value!r}")

    def _validate_swaps(self) -> None:
        from helmlm.models.hybrid import COMPONENTS

        swapped = self.swapped_components
        unknown = [c for c in swapped if c not in COMPONENTS]
        if unknown:
            raise ConfigError(f"swapped_components: unknown component {unknown[0]!r}"
                              f"{did_you_mean(unknown[0], COMPONENTS)}; the components are {', '.join(COMPONENTS)}")
        if len(set(swapped)) != len(swapped):
            raise ConfigError(f"swapped_components lists a component twice: {swapped}")
        if self.attention != "mha" or self.ffn != "dense":
            raise ConfigError("swapped_components applies to the dense multi-head models (HELM-D and LLaMA: "
                              f"attention=mha, ffn=dense); this config has attention={self.attention}, "
                              f"ffn={self.ffn}")
        if self.tie_word_embeddings:
            raise ConfigError("swapped_components does not support tie_word_embeddings")

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "HELMConfig":
        """Load a preset from ``configs/*.yaml`` (its ``model:`` section, or the whole file), with overrides.

        ``base: NAME`` in a file starts from that preset's fields (e.g. ``helm_mice_tiny_reference``: the tiny
        HELM-MiCE with the reference's initialisation), then applies the file's own."""
        config = cls(**{**model_fields(path), **overrides})
        config.validate()
        return config


def model_fields(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The model fields a preset file sets (its ``model:`` section, or the whole file), its ``base`` preset's
    first; every key is checked against :class:`HELMConfig`'s."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: its base presets form a loop ({' -> '.join(p.stem for p in _seen)})")
    data = yaml.safe_load(path.read_text()) or {}
    data = data.get("model", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of model fields (optionally under 'model:'), "
                          f"got {type(data).__name__}")
    data = dict(data)
    known = set(HELMConfig().to_dict())
    unknown = sorted(set(data) - known - {"name", "base"})
    if unknown:
        hints = [f"{k!r}{did_you_mean(k, known)}" for k in unknown]
        raise ConfigError(f"{path}: unknown model keys {', '.join(hints)}")
    data.pop("name", None)
    base = data.pop("base", None)
    return {**(model_fields(preset_path(base), (*_seen, path.resolve())) if base else {}), **data}


PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def available_presets() -> list[str]:
    """Names of the presets shipped with helmlm (``configs/*.yaml`` in a checkout)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a preset name (e.g. ``helm_d_tiny``) or path; a clear error, with a suggestion, if none."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{path.stem if path.suffix == '.yaml' else name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"no config file or preset named {str(name_or_path)!r}"
                          f"{did_you_mean(name_or_path, available_presets())}; presets: "
                          f"{', '.join(available_presets())}")
    return preset


def load_config(name_or_path: str | Path, **overrides: Any) -> HELMConfig:
    """A :class:`HELMConfig` from a YAML path or a preset name (e.g. ``helm_d_tiny``), with field overrides."""
    return HELMConfig.from_yaml(preset_path(name_or_path), **overrides)


def preset_train_settings(name_or_path: str | Path) -> dict[str, Any]:
    """The ``train:`` section of a preset file: the optimisation settings tuned for that model (learning rates,
    the table's precision; docs/quality.md), which ``helmlm train`` uses unless the recipe or the command line sets
    them. ``{}`` for a preset without one."""
    import yaml

    path = preset_path(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    train = data.get("train", {}) if isinstance(data, dict) and "model" in data else {}
    if not isinstance(train, dict):
        raise ConfigError(f"{path}: the train section must be a mapping of training settings, got {train!r}")
    return dict(train)
