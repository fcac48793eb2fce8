"""Where a run starts: its own checkpoint (``--resume``, ``--resume PATH``, ``--extend``) or another run's weights
(``train.init_from``).

A resumed run must follow the trajectory it was on, so every setting that changes it must match the checkpoint's
(:func:`config_differences`); ``--extend`` also lets ``train.steps`` grow, with the schedule re-planned over the new
total. ``init_from`` loads weights only, after checking that they fit the configured architecture.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from helmlm.config import TrainConfig
from helmlm.errors import CheckpointError, TrainingError
from helmlm.training.checkpoint import (
    STATE_FILE,
    checkpoint_model_config,
    checkpoint_root,
    find_checkpoint,
    latest_checkpoint,
    read_tensors,
)
from helmlm.training.optim import lr_multiplier

# Settings that may differ between a run and its resumption (they do not change the trajectory).
RESUME_FREE = ("eval.", "log.", "checkpoint.", "out_dir", "train.threads", "train.device", "train.strategy",
               "train.cpu_malloc", "data.dir", "data.shard_tokens", "data.batch_documents", "data.max_invalid_utf8",
               "train.init_from", "train.on_nonfinite", "train.max_nonfinite",
               "train.rollback_lr_scale")




def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "" and k == "model"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], extra_free: tuple[str, ...] = ()) -> list[str]:
    """Trajectory-relevant settings that differ between a checkpoint's config and this run's (``extra_free``:
    more keys allowed to differ, e.g. ``train.steps`` when extending)."""
    a, b = _flat(saved), _flat(current)
    free = RESUME_FREE + extra_free
    return [f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(free)]


def resume_point(config: TrainConfig, resume: bool | str | Path, extend: bool,
                 log: Callable[[str], None]) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its verified state (``None, None`` for a new run). ``resume`` is ``True``
    (the newest intact checkpoint in ``out_dir``) or a checkpoint / run directory; ``extend`` lets ``train.steps``
    grow past the checkpoint's plan. Refuses, without writing anything, whatever cannot continue exactly."""
    out_dir, steps = Path(config.out_dir), config.train.steps
    if not resume:
        if extend:
            raise TrainingError("--extend continues an existing run; use it together with --resume")
        if latest_checkpoint(out_dir) is not None:
            raise TrainingError(f"{out_dir} already holds checkpoints of a run; pass --resume to continue it, or "
                                "choose another out_dir (nothing was overwritten)")
        return None, None
    if resume is True and latest_checkpoint(out_dir) is None:
        raise TrainingError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; run without --resume to start "
                            "this run")
    try:
        checkpoint, saved = find_checkpoint(out_dir if resume is True else resume, log=log)
    except CheckpointError as err:
        raise TrainingError(f"cannot resume: {err}") from None
    current = config.to_dict()
    diffs = config_differences(saved["config"], current, extra_free=("train.steps",) if extend else ())
    if diffs:
        hint = "use the same settings, or start a new out_dir"
        if not extend and not config_differences(saved["config"], current, extra_free=("train.steps",)):
            hint = "to train beyond the planned steps add --extend (the schedule is re-planned over the new total)"
        raise TrainingError(f"cannot resume from {checkpoint}: it was written for another config ("
                            + "; ".join(diffs) + f"); {hint}")
    if extend:
        if steps <= saved["step"]:
            raise TrainingError(f"--extend: train.steps={steps} must be larger than the checkpoint's step "
                                f"{saved['step']}")
        t = config.train
        factor = lr_multiplier(saved["step"], steps, t.resolved_warmup(), t.min_lr_ratio)
        log(f"extending the run from step {saved['step']} to {steps}: the learning-rate schedule is re-planned over "
            f"{steps} steps (next lr {t.lr * factor:.3g})")
    return checkpoint, saved


def read_initial_weights(source: str | Path, model_config, log: Callable[[str], None] = print
                         ) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """The weights at ``source`` for ``train.init_from``, checked against ``model_config``'s architecture.

    ``source`` is a checkpoint, a run directory (its newest intact checkpoint) or a model directory written by
    ``save_pretrained`` / ``helmlm export``. Returns ``(state dict, tokenizer sha256 or None, description)``; the
    tokenizer hash comes from the checkpoint, or from the model directory's tokenizer when it has one."""
    from helmlm.data.tokenizer import load_tokenizer, tokenizer_hash
    from helmlm.models import HELMForCausalLM

    path = Path(source)
    if (path / "config.json").is_file() and not (path / STATE_FILE).is_file() and not checkpoint_root(path).is_dir():
        try:
            if json.loads((path / "config.json").read_text()).get("model_type") == "llama":  # an exported twin
                from transformers import LlamaForCausalLM

                from helmlm.models.hf import from_llama

                model = from_llama(LlamaForCausalLM.from_pretrained(path))
            else:
                model = HELMForCausalLM.from_pretrained(path)
            source_config, weights = model.config, model.state_dict()
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the model directory {path}: {err}") from None
        has_tokenizer = (path / "tokenizer.json").is_file()
        sha = tokenizer_hash(load_tokenizer(path)) if has_tokenizer else None
        description = f"the model directory {path}"
    elif path.is_dir():
        checkpoint, state = find_checkpoint(path, log)
        source_config = checkpoint_model_config(state)
        weights, sha = read_tensors(checkpoint / "model.safetensors"), state.get("tokenizer_sha256")
        description = f"the checkpoint {checkpoint} (step {state['step']})"
    else:
        raise CheckpointError(f"{path} does not exist; give a checkpoint, a run directory or a model directory")
    expected = {k: tuple(v.shape) for k, v in _shapes(model_config).items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        ignore = {"max_position_embeddings", "eos_token_id", "pad_token_id", "bos_token_id", "transformers_version"}
        a, b = source_config.to_dict(), model_config.to_dict()
        fields = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b))
                  if k not in ignore and a.get(k) != b.get(k)]
        raise CheckpointError(f"{description} holds another architecture than this run's model ("
                              + ("; ".join(fields) or "parameter shapes differ")
                              + "); set the model section to match it (e.g. model.preset and model.vocab_size)")
    return weights, sha, description


def _shapes(model_config) -> dict[str, torch.Tensor]:
    """The state dict of ``model_config``'s model as shapes only (built on the meta device: no memory)."""
    from helmlm.models import HELMForCausalLM

    with torch.device("meta"):
        return HELMForCausalLM(model_config).state_dict()
