"""The run configuration of ``helmlm train`` / ``prepare`` / ``demo``, every section in this one module: one YAML file
with sections, plus ``section.key=value`` overrides from the command line.

```yaml
model: helm_d_tiny                 # a preset name or YAML path, or a mapping: {preset: helm_d_tiny, hidden_size: 194}
data: {source: builtin, vocab_size: 8192, dir: runs/data/builtin}
train: {seq_len: 256, micro_batch: 16, steps: 600, lr: 3.0e-3}
eval: {every: 100, rows: 64}
log: {every: 10}
checkpoint: {every: 200, keep_last: 2}
out_dir: runs/helm_d_tiny
```

Every key is checked: an unknown one is named with the closest known key, and a value of the wrong type names the
key, the value and the expected type. Model fields are checked against :class:`~helmlm.models.HELMConfig`.

Training settings come from three places, each over the one before: the ``train:`` section of the model's preset
file (the settings tuned for that model, e.g. its learning rates; docs/quality.md), the recipe, and the command
line's ``train.key=value``. So ``helmlm train tiny model=helm_mice_tiny`` trains HELM-MiCE at its own tuned rates.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from helmlm.errors import ConfigError, DataError, did_you_mean

SOURCES = ("builtin", "local", "hf")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")
NONFINITE_POLICIES = ("stop", "skip", "rollback")
CPU_MALLOC_POLICIES = ("keep", "system")  # helmlm.training.allocator
RIEMANNIAN_LR_SCALINGS = ("sqrt_dim", "none")  # helmlm.training.optim.riemannian_lr


@dataclass
class DataConfig:
    """What to prepare. ``source``: ``builtin`` (the offline English corpus, see :mod:`helmlm.data.builtin`),
    ``local`` (``paths``: files, directories or globs) or ``hf`` (``hf_name`` / ``hf_config`` / ``hf_split``,
    streamed). ``tokenizer``: ``bpe`` trains a byte-level BPE of ``vocab_size`` on the training documents (at most
    ``tokenizer_train_documents``); anything else is a Hugging Face tokenizer directory or hub name.
    ``max_invalid_utf8``: the largest share of a local text/JSONL file's bytes that may be invalid UTF-8 (replaced
    by U+FFFD) before the file is refused as binary or wrongly encoded; 1.0 accepts anything."""

    source: str = "builtin"
    paths: list[str] = field(default_factory=list)
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None
    val_fraction: float = 0.01
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    tokenizer_train_documents: int | None = 200_000
    dir: str = "data/builtin"
    shard_tokens: int = 50_000_000
    batch_documents: int = 512
    max_invalid_utf8: float = 0.01

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"data.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.source == "local" and not self.paths:
            raise DataError("data.source=local needs data.paths (files, directories or globs)")
        if self.source == "hf" and not self.hf_name:
            raise DataError("data.source=hf needs data.hf_name (e.g. wikimedia/wikipedia with hf_config 20231101.en)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("shard_tokens", "batch_documents", "vocab_size"):
            if getattr(self, name) < 1:
                raise DataError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_invalid_utf8 <= 1.0:
            raise DataError(f"data.max_invalid_utf8 must be in [0, 1] (a share of a file's bytes; 1 accepts any "
                            f"file), got {self.max_invalid_utf8}")
        if self.max_documents is not None and self.max_documents < 1:
            raise DataError(f"data.max_documents must be >= 1 or null, got {self.max_documents}")

    def spec(self) -> dict[str, Any]:
        """The settings that determine the prepared tokens (shard size, batching and the invalid UTF-8 threshold,
        which only accepts or refuses a corpus, do not)."""
        ignored = ("dir", "shard_tokens", "batch_documents", "max_invalid_utf8")
        spec = {k: v for k, v in asdict(self).items() if k not in ignored}
        if self.source == "local":
            spec["paths"] = [str(Path(p).expanduser().resolve()) for p in self.paths]
        if self.tokenizer != "bpe":
            spec.pop("vocab_size"), spec.pop("tokenizer_train_documents")
        return spec


@dataclass
class TrainSettings:
    """The optimisation. ``micro_batch`` rows of ``seq_len`` per rank and forward; an optimizer step sees
    ``micro_batch x grad_accum x world_size`` rows. ``steps`` counts optimizer steps; warm-up is
    ``warmup_steps`` if set, else ``warmup_ratio x steps``. ``precision: auto`` is bf16 autocast on CUDA GPUs that
    support it and fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on most CPUs). ``init_from``: a checkpoint,
    run or model directory whose weights start a new run (continued pretraining, fine-tuning); the optimizer, the
    schedule and the data position start fresh. ``embedding_lr`` (default ``lr``): the token table's lr in either
    geometry; the Lorentz table's Riemannian Adam gets ``embedding_lr * sqrt(n)`` (``riemannian_lr_scaling:
    sqrt_dim``, so its rows move as far per step as AdamW's) or ``embedding_lr`` (``none``, the reference's), unless
    ``riemannian_lr`` sets it outright. ``table_dtype: float64`` keeps the Lorentz table and its Riemannian Adam
    state in float64 (lookups still return the model's dtype): in float32, rows that drift far from the origin at
    large embedding lrs break Riemannian Adam's normaliser (docs/quality.md, "numerical limit").

    Memory and speed (docs/benchmarks.md): ``loss_chunk_tokens`` > 0 computes the loss over that many tokens at a
    time without holding the full logits (:func:`helmlm.nn.loss.linear_cross_entropy`); ``activation_checkpointing``
    keeps only each block's input and recomputes the block in backward; ``compile`` compiles each block with
    ``torch.compile`` (the first steps pay the compilation); ``cpu_malloc: keep`` (training on CPU) sets glibc's
    malloc to keep freed memory for the next step instead of returning it and faulting it back in
    (:mod:`helmlm.training.allocator`; ``system`` leaves the C library's defaults). On CPU the trainer also creates
    the optimizer state before the first step (:func:`helmlm.training.optim.allocate_state`), which keeps the heap
    from fragmenting.

    A non-finite loss or gradient norm never reaches the parameters; ``on_nonfinite`` says what happens next
    (docs/reliability.md). ``stop`` ends the run with an error naming the last good checkpoint. ``skip`` drops the
    step's batches and goes on, and stops after ``max_nonfinite`` such steps in a row. ``rollback`` restores the newest
    checkpoint and goes on past every batch read since it (so the batches that led to the spike are not trained on
    again) with every learning rate multiplied by ``rollback_lr_scale`` from then on (compounding); a second failure
    before the run gets past the first goes one checkpoint further back; it stops after ``max_nonfinite`` rollbacks
    that did not get past the failure. A run that rolls back writes a checkpoint at step 0 to have one. Every event
    is a ``nonfinite`` record in ``metrics.jsonl`` (:mod:`helmlm.training.recovery`)."""

    seq_len: int = 256
    micro_batch: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 4e-4
    riemannian_lr: float | None = None
    embedding_lr: float | None = None
    riemannian_lr_scaling: str = "sqrt_dim"
    table_dtype: str = "float32"
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0
    precision: str = "auto"
    seed: int = 1234
    reset_positions: bool = False
    balance_speed: float = 0.005
    device: str = "auto"
    threads: int = 0
    strategy: str = "ddp"
    init_from: str | None = None
    loss_chunk_tokens: int = 0
    activation_checkpointing: bool = False
    compile: bool = False
    cpu_malloc: str = "keep"
    on_nonfinite: str = "stop"
    max_nonfinite: int = 5
    rollback_lr_scale: float = 0.5

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * self.steps)


@dataclass
class EvalSettings:
    """Validation every ``every`` optimizer steps and at the end, over the first ``rows`` validation rows (0: all)."""

    every: int = 100
    rows: int = 64


@dataclass
class LogSettings:
    """Metrics every ``every`` steps (JSONL always; TensorBoard if installed and enabled; a progress bar on rank
    0), manifold health (constraint violation, curvatures, expert load) every ``health_every`` steps."""

    every: int = 10
    health_every: int = 50
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointSettings:
    """A checkpoint every ``every`` steps and at the end; the last ``keep_last`` are kept."""

    every: int = 200
    keep_last: int = 2


@dataclass
class TrainConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "helm_d_tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    log: LogSettings = field(default_factory=LogSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    out_dir: str = "runs/train"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        t = self.train
        for name in ("seq_len", "micro_batch", "grad_accum", "steps"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.seq_len < 2:
            raise ConfigError(f"train.seq_len must be >= 2, got {t.seq_len}")
        for name in ("lr", "eps"):
            if not getattr(t, name) > 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(t, name)}")
        for name in ("riemannian_lr", "embedding_lr"):
            if getattr(t, name) is not None and not getattr(t, name) > 0:
                raise ConfigError(f"train.{name} must be > 0 or null, got {getattr(t, name)}")
        if t.riemannian_lr_scaling not in RIEMANNIAN_LR_SCALINGS:
            raise ConfigError(f"train.riemannian_lr_scaling must be one of {', '.join(RIEMANNIAN_LR_SCALINGS)}; "
                              f"got {t.riemannian_lr_scaling!r}")
        if t.table_dtype not in ("float32", "float64"):
            raise ConfigError(f"train.table_dtype must be float32 or float64, got {t.table_dtype!r}")
        if not 0.0 <= t.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if t.warmup_steps is not None and not 0 <= t.warmup_steps < t.steps:
            raise ConfigError(f"train.warmup_steps must be in [0, train.steps={t.steps}), got {t.warmup_steps}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
        for name in ("weight_decay", "clip", "balance_speed", "threads", "loss_chunk_tokens"):
            if getattr(t, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        for name, allowed in (("precision", PRECISIONS), ("device", DEVICES), ("strategy", STRATEGIES),
                              ("cpu_malloc", CPU_MALLOC_POLICIES)):
            if getattr(t, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {', '.join(allowed)}; got {getattr(t, name)!r}")
        if t.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}; got "
                              f"{t.on_nonfinite!r}{did_you_mean(t.on_nonfinite, NONFINITE_POLICIES)}")
        if t.max_nonfinite < 1:
            raise ConfigError(f"train.max_nonfinite must be >= 1, got {t.max_nonfinite}")
        if not 0 < t.rollback_lr_scale <= 1:
            raise ConfigError(f"train.rollback_lr_scale must be in (0, 1], got {t.rollback_lr_scale}")
        for section, name in (("eval", "every"), ("log", "every"), ("log", "health_every"),
                              ("checkpoint", "every"), ("checkpoint", "keep_last")):
            if getattr(getattr(self, section), name) < 1:
                raise ConfigError(f"{section}.{name} must be >= 1, got {getattr(getattr(self, section), name)}")
        if self.eval.rows < 0:
            raise ConfigError(f"eval.rows must be >= 0 (0: all), got {self.eval.rows}")
        try:
            self.data.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._check_table_settings(self.model_config())  # model_config raises ConfigError naming the model field

    def _check_table_settings(self, model) -> None:
        """Settings for a table of Lorentz points (Riemannian Adam) are an error for a model that has none, instead
        of being ignored: a Euclidean table (the twins'), or HELM's space-part table (``project_emb``)."""
        points = model.component_geometry("embedding") == "lorentz" and not model.project_emb
        if points:
            return
        table = ("a table of space parts (model.project_emb=true), trained by AdamW in the model's dtype"
                 if model.project_emb else "a Euclidean token table")
        for name, value, default in (("table_dtype", self.train.table_dtype, "float32"),
                                     ("riemannian_lr", self.train.riemannian_lr, None)):
            if value != default:
                fix = " (or set model.project_emb=false for a table of points)" if model.project_emb else ""
                raise ConfigError(f"train.{name}={value} applies to a table of Lorentz points trained by Riemannian "
                                  f"Adam; this model has {table}. Remove train.{name}{fix}")

    def model_config(self):
        """The :class:`HELMConfig`: the preset (or YAML) named by ``model.preset`` with the other ``model`` keys as
        overrides; ``max_position_embeddings`` is raised to ``train.seq_len`` if needed."""
        from helmlm.models import HELMConfig, load_config

        fields = dict(self.model)
        preset = fields.pop("preset", None)
        known = set(HELMConfig().to_dict())
        _check_keys(fields, known, "model")
        config = load_config(preset, **fields) if preset else HELMConfig(**fields)
        if config.max_position_embeddings < self.train.seq_len:
            config.max_position_embeddings = self.train.seq_len
        config.validate()
        return config


SECTIONS = {"data": DataConfig, "train": TrainSettings, "eval": EvalSettings, "log": LogSettings,
            "checkpoint": CheckpointSettings}


# Names other trainers use for our settings, so that a typo'd or habitual key still gets a suggestion.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps", "total_steps": "steps",
           "batch_size": "micro_batch", "micro_batch_size": "micro_batch", "per_device_batch_size": "micro_batch",
           "gradient_accumulation_steps": "grad_accum", "grad_accum_steps": "grad_accum",
           "accumulation_steps": "grad_accum", "seq_length": "seq_len", "sequence_length": "seq_len",
           "max_seq_len": "seq_len", "context_length": "seq_len", "block_size": "seq_len", "warmup": "warmup_steps",
           "max_grad_norm": "clip", "grad_clip": "clip", "dtype": "precision", "mixed_precision": "precision",
           "min_lr": "min_lr_ratio", "adam_beta1": "beta1", "adam_beta2": "beta2", "adam_eps": "eps",
           "eval_every": "every", "eval_interval": "every", "save_every": "every", "keep": "keep_last",
           "init": "init_from", "init_checkpoint": "init_from", "pretrained": "init_from"}


def _check_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        hints = []
        for key in unknown:
            match = [ALIASES[key]] if ALIASES.get(key) in known else \
                difflib.get_close_matches(key, sorted(known), 1, 0.6)
            hints.append(f"{where}.{key}" + (f" (did you mean {where}.{match[0]}?)" if match else ""))
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as ``annotation`` (str, int, float, bool, list[str], or ``X | None``), from YAML or a CLI string."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    expected = getattr(annotation, "__name__", str(annotation))
    bad = ConfigError(f"{name} must be {'a list of strings' if origin is list else f'of type {expected}'}, "
                      f"got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return value
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise bad
        return value
    if annotation is int:
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    _check_keys(data, {f.name for f in dataclasses.fields(cls)}, where)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` (or ``out_dir=...``, ``model=preset``, ``model.field=value``) to ``raw``."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value (e.g. train.lr=1e-3)")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    top = parts[0]
    known = set(SECTIONS) | {"model", "out_dir"}
    if top not in known:
        _check_keys({top: None}, known, "config")
    if len(parts) == 1:
        if top in SECTIONS:
            raise ConfigError(f"{top} is a section; override its keys, e.g. {top}.<key>=value")
        raw[top] = text if top != "model" else {"preset": text}
        return
    if len(parts) != 2 or top == "out_dir":
        raise ConfigError(f"override key {key!r} must be section.key (e.g. train.lr)")
    section = raw.setdefault(top, {})
    if top == "model" and isinstance(section, str):
        section = raw["model"] = {"preset": section}
    if not isinstance(section, dict):
        raise ConfigError(f"{top} must be a mapping to override {key}")
    # A string keeps its text for str-typed fields (a preset or path that happens to look like a number)
    section[parts[1]] = _parse_scalar(text)


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file (or a shipped recipe name, or the defaults when ``None``)
    and ``key=value`` overrides."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        file = resolve_recipe(path)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a mapping with sections model, data, train, ...; got "
                              f"{type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    return train_config_from_dict(raw)


def train_config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from its dict form (a parsed YAML file, or ``TrainConfig.to_dict()`` as
    stored in a checkpoint)."""
    _check_keys(raw, set(SECTIONS) | {"model", "out_dir"}, "config")
    model = raw.get("model", {"preset": "helm_d_tiny"})
    if isinstance(model, str):
        model = {"preset": model}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a preset name, a YAML path or a mapping of model fields; got {model!r}")
    train = raw.get("train") or {}
    if isinstance(train, dict) and model.get("preset") is not None:
        from helmlm.models.config import preset_train_settings

        train = {**preset_train_settings(model["preset"]), **train}  # the recipe and the command line win
    kwargs = {name: _build(cls, (train if name == "train" else raw.get(name)) or {}, name)
              for name, cls in SECTIONS.items()}
    config = TrainConfig(model=dict(model), out_dir=_coerce(raw.get("out_dir", "runs/train"), str, "out_dir"),
                         **kwargs)
    config.validate()
    return config


RECIPES_DIR = Path(__file__).resolve().parent / "presets" / "train"


def resolve_shipped(name_or_path: str | Path, directory: Path, kind: str, noun: str, listing: str) -> Path:
    """A YAML path, or the file of that name shipped in ``directory``; otherwise an error that lists them."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = directory / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in directory.glob("*.yaml"))
    raise ConfigError(f"no {kind} {str(name_or_path)!r}{did_you_mean(path.stem, names)} (not a file, and no shipped "
                      f"{noun} of that name; {listing}: {', '.join(names)})")


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A training YAML path, or the shipped recipe of that name (``helmlm train demo_helm_d``)."""
    return resolve_shipped(name_or_path, RECIPES_DIR, "training config", "recipe", "recipes")
