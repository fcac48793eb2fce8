"""Fine-tuning a Hugging Face causal LM with LoRA or HypLoRA on instruction data (``helmlm finetune``).

The run directory holds ``finetune.json`` (the settings), ``metrics.jsonl`` (train loss, eval loss), checkpoints
(the trainable tensors, the optimizer and the RNG states, in helmlm's checkpoint format: safetensors and JSON) and,
at the end, ``adapter/`` in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``). A killed run
continues with ``resume=True`` from its newest intact checkpoint and ends with the same adapter as an uninterrupted
run: the data order of each epoch is drawn from the seed and the epoch, so the step number says where to go on.

Recipe: AdamW, linear warm-up then linear decay to 0 (as the HypLoRA reference), weight decay on the low-rank
matrices only (HypLoRA's curvature and input scale are scalars outside it), loss on the response tokens unless
``train_on_inputs``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from helmlm.data.instructions import IGNORE_INDEX, Instruction, encode, read_instructions
from helmlm.errors import AdapterError, ConfigError
from helmlm.training.checkpoint import find_checkpoint, read_tensors, restore_optimizer_state, save_checkpoint

METHODS = ("lora", "hyplora")
SETTINGS_FILE, METRICS_FILE, ADAPTER_DIR = "finetune.json", "metrics.jsonl", "adapter"
# The modules the HypLoRA reference adapts (LLM-Adapters' convention), when a model has them.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass
class FinetuneSettings:
    """What ``helmlm finetune`` takes; every field is recorded in ``finetune.json``."""

    base_dir: str
    data: str
    out_dir: str
    method: str = "hyplora"
    variant: str = "paper"
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None
    dropout: float = 0.05
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 256
    eval_data: str | None = None
    eval_every: int = 50
    save_every: int = 50
    train_on_inputs: bool = False
    curvature: float = 1.0
    learn_curvature: bool = True
    input_scale: float | None = None
    seed: int = 0
    dtype: str = "float32"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("rank", "epochs", "batch_size", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens, got {self.max_length}")
        for name in ("alpha", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0:
            raise ConfigError("dropout and warmup_ratio must be in [0, 1) and weight_decay >= 0")


def adapter_config(settings: FinetuneSettings, targets: list[str]):
    """The PEFT config of the run: a ``LoraConfig`` or a :class:`~helmlm.peft.HypLoraConfig`."""
    from peft import LoraConfig

    from helmlm.peft import HypLoraConfig

    common = dict(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                  task_type="CAUSAL_LM")
    if settings.method == "lora":
        return LoraConfig(**common)
    try:
        return HypLoraConfig(**common, hyplora_variant=settings.variant, curvature=settings.curvature,
                             learn_curvature=settings.learn_curvature, input_scale=settings.input_scale)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``nn.Linear`` and GPT-2's ``Conv1D``), head excluded."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and m is not head})


def resolve_targets(model: nn.Module, requested: list[str] | None) -> list[str]:
    """``requested`` if every name is one of the model's linear layers, else an error listing them; by default the
    reference's ``q/k/v/up/down_proj`` where present, else every linear layer but the head."""
    available = linear_module_names(model)
    if requested is None:
        return [t for t in DEFAULT_TARGETS if t in available] or available
    unknown = [t for t in requested if t not in available]
    if unknown:
        raise AdapterError(f"target module(s) {', '.join(unknown)} not in the model; its linear modules are: "
                           f"{', '.join(available)}")
    return list(requested)


def batches_of_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each step of ``epoch``: a permutation drawn from ``(seed, epoch)``, cut into batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` on padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def eval_loss(model: nn.Module, encoded: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean loss per target token over ``encoded`` (the tokens under the loss, as in training)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i:i + batch_size], pad_id)
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if tokens:
            total += float(model(**_to(batch, model)).loss) * tokens
            count += tokens
    model.train(was_training)
    return total / max(count, 1)


def _to(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _claim_out_dir(settings: FinetuneSettings, resume: bool) -> Path:
    out = Path(settings.out_dir)
    held = out / SETTINGS_FILE
    if resume:
        if not held.is_file():
            raise AdapterError(f"{out} holds no fine-tuning run to resume (no {SETTINGS_FILE}); drop --resume")
        saved = {k: v for k, v in json.loads(held.read_text()).items() if k not in ("eval_every", "save_every")}
        mine = {k: v for k, v in asdict(settings).items() if k not in ("eval_every", "save_every")}
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if changed:
            raise AdapterError(f"{out} was started with other settings ({', '.join(changed)} differ); resume with the "
                               "same ones or choose another --out")
        return out
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out} exists and is not empty; choose another --out, or pass --resume to continue the "
                           "run there")
    return out


def _load_data(settings: FinetuneSettings, tokenizer) -> tuple[list[dict], list[dict]]:
    def encoded(examples: list[Instruction]) -> list[dict]:
        return [encode(tokenizer, e, settings.max_length, settings.train_on_inputs) for e in examples]

    train = encoded(read_instructions(settings.data))
    evals = encoded(read_instructions(settings.eval_data)) if settings.eval_data else []
    if not any(IGNORE_INDEX != label for e in train for label in e["labels"][1:]):
        raise AdapterError(f"no response token of {settings.data} fits in max_length={settings.max_length}; raise it")
    return train, evals


def _optimizer(model: nn.Module, settings: FinetuneSettings) -> torch.optim.AdamW:
    from helmlm.peft import no_decay_parameter_names

    no_decay = no_decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n not in no_decay], "weight_decay": settings.weight_decay},
              {"params": [p for n, p in params if n in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)


def _restore(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, log) -> int:
    """Load the newest intact checkpoint of ``out`` into the trainable tensors and the optimizer; its step."""
    path, state = find_checkpoint(out, log=log)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = read_tensors(path / "model.safetensors")
    if set(saved) != set(trainable):
        raise AdapterError(f"checkpoint {path} does not fit this adapter; was it written by another run?")
    with torch.no_grad():
        for name, value in saved.items():
            trainable[name].copy_(value)
    optimizer.load_state_dict(restore_optimizer_state(path, state)["optimizers"][0])
    return int(state["step"])


def _save_adapter(model: nn.Module, out: Path) -> Path:
    """``out/adapter`` in PEFT's format, written under a temporary name and then renamed into place."""
    tmp, final = out / f".{ADAPTER_DIR}.tmp", out / ADAPTER_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


@dataclass
class _Run:
    """What the training loop works on."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: list[dict]
    evals: list[dict]
    pad_id: int
    steps_per_epoch: int
    total: int
    warmup: int
    step: int


def _start(settings: FinetuneSettings, out: Path, resume: bool, log) -> _Run:
    """Load the base model and the data, wrap the model, and restore the newest checkpoint when resuming."""
    from peft import get_peft_model

    from helmlm.peft import load_base_model

    base, tokenizer = load_base_model(settings.base_dir, settings.dtype)
    train, evals = _load_data(settings, tokenizer)
    targets = resolve_targets(base, settings.target_modules)
    torch.manual_seed(settings.seed)
    model = get_peft_model(base, adapter_config(settings, targets))
    model.train()
    optimizer = _optimizer(model, settings)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=1) + "\n")
    step = _restore(out, model, optimizer, log) if resume and (out / "checkpoints").is_dir() else 0
    _keep_metrics_up_to(out / METRICS_FILE, step)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = f"hyplora ({settings.variant})" if settings.method == "hyplora" else "lora"
    log(f"{kind} on {', '.join(targets)}: {trainable:,} trainable parameters; {len(train)} examples, {total} steps"
        + (f", resuming at step {step}" if step else ""))
    return _Run(model, optimizer, train, evals, pad_id, steps_per_epoch, total,
                max(1, round(settings.warmup_ratio * total)), step)


def _train_step(run: _Run, settings: FinetuneSettings) -> dict[str, Any]:
    epoch, index = divmod(run.step, run.steps_per_epoch)
    rows = batches_of_epoch(len(run.train), settings.batch_size, settings.seed, epoch)[index]
    for group in run.optimizer.param_groups:
        group["lr"] = settings.lr * lr_factor(run.step, run.total, run.warmup)
    loss = run.model(**_to(collate([run.train[i] for i in rows], run.pad_id), run.model)).loss
    if not torch.isfinite(loss):
        raise AdapterError(f"the loss is {float(loss)} at step {run.step}; lower --lr")
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {"kind": "train", "step": run.step, "epoch": epoch, "loss": float(loss.detach()),
            "lr": run.optimizer.param_groups[0]["lr"]}


def finetune(settings: FinetuneSettings, resume: bool = False, log=print, progress: bool = True) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) a fine-tuning run; return its summary (also in ``summary.json``)."""
    from tqdm.auto import tqdm

    settings.validate()
    out = _claim_out_dir(settings, resume)
    run = _start(settings, out, resume, log)
    bar = tqdm(total=run.total, initial=run.step, disable=not progress, desc="finetune", unit="step")
    row: dict[str, Any] = {}
    while run.step < run.total:
        row = _train_step(run, settings)
        if run.evals and (run.step % settings.eval_every == 0 or run.step == run.total):
            row["eval_loss"] = eval_loss(run.model, run.evals, run.pad_id, settings.batch_size)
        _append(out / METRICS_FILE, row)
        bar.update(1)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "eval_loss") if k in row})
        if run.step % settings.save_every == 0 and run.step < run.total:
            save_checkpoint(out, run.step, {n: p for n, p in run.model.named_parameters() if p.requires_grad},
                            {"optimizers": [run.optimizer.state_dict()]}, {"config": asdict(settings)})
    bar.close()
    adapter = _save_adapter(run.model, out)
    summary = {"adapter": str(adapter), "steps": run.total,
               "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
               "final_train_loss": row.get("loss"), "final_eval_loss": row.get("eval_loss")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the metric rows past ``step`` (a resumed run writes them again)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
