"""The pretraining loop: ``helmlm train CONFIG.yaml [key=value ...] [--resume]``, on one CPU, one GPU or many
processes (``torchrun --nproc_per_node N -m helmlm train ...``).

One optimizer step:

1. lr factor from :func:`lr_multiplier` (warm-up, cosine to ``min_lr_ratio``) set on both optimizers;
2. ``grad_accum`` micro-batches per rank from the packed row stream (each rank its own slice of the global batch);
   the loss is **token-weighted over the global batch**: each micro-batch contributes its summed cross-entropy
   divided by the global number of targets (one all-reduce of a count per step), so any split of the same global
   batch over ranks and micro-batches gives the same gradient; routed layers add ``moe_balance_alpha`` times their
   balance loss, averaged over micro-batches and ranks;
3. gradient clipping; a non-finite loss or gradient norm stops the run (:class:`NonFiniteLossError` names the step)
   before the optimizer touches the parameters, so the last checkpoint stays the last good state;
4. AdamW + Riemannian Adam step, then the loss-free MiCE bias update from the step's expert counts (all-reduced);
5. logging (JSONL, TensorBoard, progress bar), validation, manifold health and checkpoints on their schedules.

Determinism: with the same config and thread count on CPU, a run resumed from a checkpoint ends bit-identical to an
uninterrupted one (model and optimizer state, data position and RNG are all restored).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geoopt
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from helmlm.config import TrainConfig
from helmlm.data.packing import PackedRows, RowStream
from helmlm.data.shards import prepare_data
from helmlm.errors import NonFiniteLossError, TrainingError  # noqa: F401  (re-exported)
from helmlm.geometry import manifold_violation
from helmlm.models import HELMForCausalLM
from helmlm.models.modeling import causal_lm_loss, lm_targets, padded_document_ids
from helmlm.models.params import count_parameters
from helmlm.nn.mice import LorentzExperts
from helmlm.nn.routing import balance_step, routed_layers, routing_stats
from helmlm.training.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_initial_weights,
    save_checkpoint,
)
from helmlm.training.fsdp import average_ignored_gradients, clip_gradients, full, shard_euclidean_parts
from helmlm.training.optim import build_optimizer, lr_multiplier

# Settings that may differ between a run and its resumption (they do not change the trajectory).
RESUME_FREE = ("eval.", "log.", "checkpoint.", "out_dir", "train.threads", "train.device", "train.strategy",
               "data.dir", "data.shard_tokens", "data.batch_documents", "data.max_invalid_utf8", "train.init_from")




@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=dev)


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


def _record_step(line: str) -> float:
    """The step of a metrics line; a torn last line (a kill mid-write) or an empty one counts as infinitely late."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLog:
    """Rank 0's metrics: ``metrics.jsonl`` (always), TensorBoard scalars (when installed and enabled)."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():  # drop records past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if _record_step(line) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("note: TensorBoard is not installed (pip install 'helmlm[tensorboard]'); logging to "
                      f"{self.path} only", file=sys.stderr)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
                elif isinstance(v, list):
                    for i, x in enumerate(v):
                        if isinstance(x, (int, float)):
                            self.writer.add_scalar(f"{kind}/{k}/{i}", x, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """Builds data, model and optimizers from a :class:`TrainConfig` and runs :meth:`fit`."""

    def __init__(self, config: TrainConfig, resume: bool | str | Path = False, dist_env: Distributed | None = None,
                 extend: bool = False):
        self.config, t = config, config.train
        self.env = dist_env or init_distributed(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.out_dir = Path(config.out_dir)
        self.log_fn = (lambda msg: print(msg, file=sys.stderr, flush=True)) if self.env.is_main else (lambda msg: None)

        # Resume checks come first, so that a refused resume writes nothing.
        self.checkpoint, saved = self._resume_point(resume, extend)
        if t.init_from and self.checkpoint is None and not Path(t.init_from).exists():
            raise TrainingError(f"train.init_from={t.init_from} does not exist; give a checkpoint, a run directory or "
                                "a model directory (helmlm export output)")

        # Data: rank 0 prepares (or reuses) the shards while the others wait; a failure there stops every rank.
        failed = torch.zeros(1, device=self.env.device)
        error = None
        if self.env.is_main:
            try:
                prepare_data(config.data, progress=config.log.progress)
            except Exception as err:  # re-raised below, after the other ranks have been told
                error, failed[0] = err, 1.0
        self.env.all_reduce(failed)
        if error is not None:
            raise error
        if failed.item():
            raise TrainingError("data preparation failed on rank 0 (its error message says why)")
        self.data_dir = Path(config.data.dir)
        self.train_rows = PackedRows(self.data_dir, "train", t.seq_len, t.reset_positions)
        self.val_rows = PackedRows(self.data_dir, "val", t.seq_len, t.reset_positions) \
            if self.train_rows.shards.manifest["splits"]["val"].get("tokens", 0) else None
        if self.val_rows is None:
            self.log_fn(f"warning: {self.data_dir} has no validation tokens (data.val_fraction="
                        f"{config.data.val_fraction}): validation loss will not be reported")
        self.tokenizer_sha = self.train_rows.shards.manifest["tokenizer"]["sha256"]
        if saved is not None and saved.get("tokenizer_sha256") != self.tokenizer_sha:
            raise TrainingError(f"cannot resume from {self.checkpoint}: its data used another tokenizer "
                                f"({saved.get('tokenizer_sha256', '?')[:12]} vs {self.tokenizer_sha[:12]})")
        self.stream = RowStream(self.train_rows.num_rows, t.seed)

        # Model and optimizer (same seed on every rank: identical initial weights).
        self.model_config = self._sized_model_config(self.train_rows.shards.vocab_size)
        torch.manual_seed(t.seed)
        self.model = HELMForCausalLM(self.model_config).to(self.env.device)
        if t.init_from and self.checkpoint is None:  # shard after loading: FSDP replaces the parameters
            self._load_initial_weights(t.init_from)
        self.fsdp = self.env.active and t.strategy == "fsdp"
        if self.fsdp:  # shard before building the optimizer: sharding replaces the parameters
            shard_euclidean_parts(self.model)
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps,
                                         t.riemannian_lr)
        self.routed = bool(routed_layers(self.model))
        self.step, self.tokens_seen, self.last_metrics = 0, 0, {}
        if self.checkpoint is not None:
            state = load_checkpoint(self.checkpoint, self.model, self.optimizer)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.stream.position = state["data_position"]
            self.last_metrics = state.get("metrics", {})
            self.log_fn(f"resumed from {self.checkpoint} (step {self.step}, {self.tokens_seen:,} tokens)")
        self.wrapped = self._wrap(self.model)
        self.autocast = self._autocast_dtype()

    def _resume_point(self, resume: bool | str | Path, extend: bool) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to resume from and its verified state (``None, None`` for a new run). ``resume`` is
        ``True`` (this run's newest intact checkpoint) or a checkpoint / run directory; ``extend`` lets
        ``train.steps`` grow past the checkpoint's plan."""
        if not resume:
            if extend:
                raise TrainingError("--extend continues an existing run; use it together with --resume")
            if latest_checkpoint(self.out_dir) is not None:
                raise TrainingError(f"{self.out_dir} already holds checkpoints of a run; pass --resume to continue "
                                    "it, or choose another out_dir (nothing was overwritten)")
            return None, None
        if resume is True and latest_checkpoint(self.out_dir) is None:
            raise TrainingError(f"--resume: no checkpoint in {self.out_dir / 'checkpoints'}; run without --resume "
                                "to start this run")
        try:
            checkpoint, saved = find_checkpoint(self.out_dir if resume is True else resume, log=self.log_fn)
        except CheckpointError as err:
            raise TrainingError(f"cannot resume: {err}") from None
        current, steps = self.config.to_dict(), self.config.train.steps
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
            t = self.config.train
            factor = lr_multiplier(saved["step"], steps, t.resolved_warmup(), t.min_lr_ratio)
            self.log_fn(f"extending the run from step {saved['step']} to {steps}: the learning-rate schedule is "
                        f"re-planned over {steps} steps (next lr {t.lr * factor:.3g})")
        return checkpoint, saved

    def _sized_model_config(self, n_ids: int):
        """The model config, its vocabulary sized to the tokenizer's ``n_ids`` ids unless ``model.vocab_size`` is
        set explicitly (then it must hold every id)."""
        config = self.config.model_config()
        if n_ids > config.vocab_size:
            raise TrainingError(f"the tokenizer has {n_ids:,} token ids but the model's vocab_size is "
                                f"{config.vocab_size:,}; set model.vocab_size={n_ids} (or larger), or prepare data "
                                f"with data.vocab_size <= {config.vocab_size}")
        if n_ids < config.vocab_size and "vocab_size" not in self.config.model:
            self.log_fn(f"note: the model's vocabulary follows the tokenizer: {n_ids:,} ids instead of the preset's "
                        f"{config.vocab_size:,} (set model.vocab_size to choose another size)")
            config.vocab_size = n_ids
        return config

    def _load_initial_weights(self, source: str) -> None:
        """``train.init_from``: the weights of a checkpoint, run or model directory; the optimizer starts fresh."""
        try:
            weights, tokenizer_sha, description = read_initial_weights(source, self.model_config, self.log_fn)
        except CheckpointError as err:
            raise TrainingError(f"train.init_from: {err}") from None
        if tokenizer_sha is not None and tokenizer_sha != self.tokenizer_sha:
            raise TrainingError(f"train.init_from={source} was trained with another tokenizer than this run's data "
                                f"({tokenizer_sha[:12]} vs {self.tokenizer_sha[:12]}); prepare the data with that "
                                "tokenizer (data.tokenizer=ITS_DIRECTORY) and a new data.dir")
        self.model.load_state_dict(weights)
        self.log_fn(f"initialised the weights from {description}; the optimizer starts fresh")

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.env.active or self.fsdp:
            return model
        ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
        # No buffer broadcast: buffers are identical on every rank by construction (gate biases move by the same
        # all-reduced update), and broadcasting would overwrite each rank's expert counts between micro-batches.
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.config.train.precision
        if p == "bf16" or (p == "auto" and self.env.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return None

    # ------------------------------------------------------------------------------------------------------------
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed next-token cross-entropy of a micro-batch (fp32) and the routed layers' balance loss."""
        with torch.autocast(self.env.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            out = self.wrapped(batch["input_ids"], document_ids=batch["document_ids"],
                               position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        docs = padded_document_ids(batch["document_ids"], batch["attention_mask"])
        return causal_lm_loss(out.logits, batch["input_ids"], docs, reduction="sum"), out.aux_loss

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _count_targets(batch: dict[str, torch.Tensor]) -> int:
        docs = padded_document_ids(batch["document_ids"], batch["attention_mask"])
        return int((lm_targets(batch["input_ids"], docs) != -100).sum())

    def train_step(self) -> dict[str, float]:
        t, env = self.config.train, self.env
        lr_factor = lr_multiplier(self.step, t.steps, t.resolved_warmup(), t.min_lr_ratio)
        self.optimizer.set_lr(lr_factor)
        micro = self.stream.global_batch(t.micro_batch, t.grad_accum, env.world_size, env.rank)
        batches = [self.train_rows.batch(rows) for rows in micro]
        counts = torch.tensor([float(sum(self._count_targets(b) for b in batches)),
                               float(sum(int(b["attention_mask"].sum()) for b in batches))], dtype=torch.float64)
        n_targets, n_tokens = (int(x) for x in env.all_reduce(counts.to(env.device)).tolist())
        alpha = self.model_config.moe_balance_alpha if self.routed else 0.0
        ce_total = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, batch in enumerate(batches):
            batch = self._to_device(batch)
            sync = i == len(batches) - 1 or not env.active
            if self.fsdp:
                self.model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or self.fsdp else self.wrapped.no_sync():
                ce_sum, aux = self._forward_loss(batch)
                loss = ce_sum * (env.world_size / max(1, n_targets))
                if aux is not None and alpha:
                    loss = loss + alpha * aux / len(batches)
                loss.backward()
            ce_total += ce_sum.detach().double()
        if self.fsdp:
            average_ignored_gradients(self.model)
            grad_norm = clip_gradients(list(self.model.parameters()), t.clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       t.clip if t.clip > 0 else float("inf"))
        loss_value, norm_value = env.all_reduce(ce_total).item() / max(1, n_targets), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise NonFiniteLossError(f"non-finite {what} ({loss_value if what == 'loss' else norm_value}) at step "
                                     f"{self.step + 1}; stopped before updating the parameters; "
                                     f"{self._last_good()}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        health_due = (self.step + 1) % self.config.log.health_every == 0 or self.step + 1 == t.steps
        load = routing_stats(self.model) if health_due and self.routed else None
        balance_step(self.model, t.balance_speed)
        self.step += 1
        self.tokens_seen += n_tokens
        metrics = {"loss": loss_value, "lr": t.lr * lr_factor, "grad_norm": norm_value, "tokens": self.tokens_seen,
                   "epoch": self.stream.epoch}
        if load is not None:
            metrics["expert_load"] = {name: s["load"] for name, s in load.items()}
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss and perplexity over the first ``eval.rows`` validation rows (all ranks)."""
        if self.val_rows is None:
            return {}
        self.model.eval()
        t, env = self.config.train, self.env
        n_rows = self.val_rows.num_rows if self.config.eval.rows == 0 else min(self.config.eval.rows,
                                                                                 self.val_rows.num_rows)
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        starts = list(range(0, n_rows, t.micro_batch))
        rounds = -(-len(starts) // env.world_size)  # every rank runs as many forwards (FSDP gathers in forward)
        for i in range(env.rank, rounds * env.world_size, env.world_size):
            real = i < len(starts)
            start = starts[i] if real else 0
            batch = self.val_rows.batch(list(range(start, min(start + t.micro_batch, n_rows))))
            ce_sum, _ = self._forward_loss(self._to_device(batch))  # balance statistics are not updated in eval
            if real:
                sums[1] += self._count_targets(batch)
                sums[0] += ce_sum.double()
        env.all_reduce(sums)
        self.model.train()
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(sums[1].item())}

    @torch.no_grad()
    def health(self) -> dict[str, Any]:
        """Manifold health: the embedding table's largest constraint violation, expert curvatures."""
        out: dict[str, Any] = {}
        table = getattr(self.model.model.embed, "weight", None)
        if isinstance(table, geoopt.ManifoldParameter):
            out["embedding_violation"] = manifold_violation(table, self.model_config.curvature,
                                                            relative_to="scale").max().item()
        curv = {name: full(m.curvatures).tolist() for name, m in self.model.named_modules()
                if isinstance(m, LorentzExperts)}
        if curv:
            out["expert_curvatures"] = curv
        return out

    def _last_good(self) -> str:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return ("no checkpoint was written yet. Lower train.lr or raise train.warmup_ratio, then start the run "
                    "again (without --resume)")
        return f"the last good checkpoint is {ckpt}. Lower train.lr or raise train.warmup_ratio, then resume with --resume"

    def save(self) -> Path | None:
        """Write a checkpoint (every rank takes part, rank 0 writes), unless a parameter is no longer finite: then
        stop, and the previous checkpoint stays the latest."""
        peak = torch.stack([full(p.detach().abs().amax()).float() for p in self.model.parameters()])
        if not torch.isfinite(peak).all():
            raise NonFiniteLossError(f"non-finite parameters after step {self.step}; not saved; {self._last_good()}")
        model_state = {k: full(v) for k, v in self.model.state_dict().items()}
        opt_state = self.optimizer.state_dict()
        for opt in opt_state["optimizers"]:
            opt["state"] = {pid: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                            for pid, entry in opt["state"].items()}
        path = None
        if self.env.is_main:
            state = {"config": self.config.to_dict(), "model_config": self.model_config.to_diff_dict(),
                     "data_position": self.stream.position,
                     "tokens_seen": self.tokens_seen, "tokenizer_sha256": self.tokenizer_sha,
                     "metrics": self.last_metrics}
            path = save_checkpoint(self.out_dir, self.step, model_state, opt_state, state,
                                   self.config.checkpoint.keep_last)
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        self.env.barrier()
        return path

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; return the last training and validation metrics. ``tokens_per_s`` is end to end
        (validation and checkpoints included)."""
        cfg, t, env = self.config, self.config.train, self.env
        main = env.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out_dir, cfg.log.tensorboard, self.step if self.checkpoint else None) if main else None
        n_params = count_parameters(self.model_config)
        pack = self.train_rows.stats
        self.log_fn(f"train: {self.model_config.geometry} {self.model_config.attention}/{self.model_config.ffn}, "
                    f"{n_params['total']:,} parameters; {pack.tokens:,} train tokens in {pack.rows:,} rows of "
                    f"{t.seq_len} ({pack.efficiency:.1%} filled); global batch "
                    f"{t.micro_batch * t.grad_accum * env.world_size} rows x {t.steps} steps on "
                    f"{env.world_size} x {env.device.type}")
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", disable=not (main and cfg.log.progress),
                   dynamic_ncols=True)
        start, start_tokens = time.perf_counter(), self.tokens_seen
        result: dict[str, Any] = {}
        try:
            while self.step < t.steps:
                metrics = self.train_step()
                elapsed = time.perf_counter() - start
                metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / max(elapsed, 1e-9)
                self.last_metrics = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:,.0f}", refresh=False)
                last = self.step == t.steps
                if log and (self.step % cfg.log.every == 0 or last):
                    log.write("train", self.step, {k: v for k, v in metrics.items() if k != "expert_load"})
                if self.step % cfg.log.health_every == 0 or last:
                    health = self.health()
                    if "expert_load" in metrics:
                        health["expert_load"] = metrics["expert_load"]
                    if log and health:
                        log.write("health", self.step, health)
                if self.step % cfg.eval.every == 0 or last:
                    val = self.evaluate()
                    if val:
                        self.last_metrics.update(val)
                        if log:
                            log.write("eval", self.step, val)
                        message = f"step {self.step}: val loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.2f}"
                        if main and cfg.log.progress:
                            bar.write(message, file=sys.stderr)
                        else:
                            self.log_fn(message)
                if self.step % cfg.checkpoint.every == 0 or last:
                    self.save()
            result = dict(self.last_metrics)
        finally:
            bar.close()
            if log:
                log.close()
        self.log_fn(self._summary(result, time.perf_counter() - start, ran=self.tokens_seen > start_tokens))
        return result

    def _summary(self, metrics: dict[str, Any], seconds: float, ran: bool) -> str:
        """The one line that ends a run: where it stands and where its checkpoint is."""
        t = self.config.train
        parts = [f"step {self.step}/{t.steps}"]
        if "loss" in metrics:
            parts.append(f"train loss {metrics['loss']:.4f}")
        if "val_loss" in metrics:
            parts.append(f"val loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.2f})")
        parts.append(f"{self.tokens_seen:,} tokens")
        head = f"done in {seconds:.1f} s" if ran else "nothing to do: the run is already complete (--extend with a " \
                                                       "larger train.steps trains it further)"
        return f"{head}: {', '.join(parts)}; checkpoint {latest_checkpoint(self.out_dir)}"


def train(config: TrainConfig, resume: bool | str | Path = False, extend: bool = False) -> dict[str, Any]:
    """Run a training job from a config (see :class:`Trainer`); returns the final metrics. ``resume``: ``True``
    continues from the newest intact checkpoint in ``out_dir``, a path from that checkpoint or run directory;
    ``extend`` lets a resumed run grow to a larger ``train.steps``."""
    trainer = Trainer(config, resume=resume, extend=extend)
    try:
        return trainer.fit()
    finally:
        if trainer.env.active and dist.is_initialized():
            dist.destroy_process_group()
