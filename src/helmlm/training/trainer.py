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

The pieces around the loop have their own modules: where a run starts (:mod:`helmlm.training.resume`), the
checkpoint format (:mod:`helmlm.training.checkpoint`), processes, sharding and precision
(:mod:`helmlm.training.distributed`), what is recorded (:mod:`helmlm.training.metrics`) and the validation loss
(:func:`helmlm.eval.validation_loss`).

Determinism: with the same config and thread count on CPU, a run resumed from a checkpoint ends bit-identical to an
uninterrupted one (model and optimizer state, data position and RNG are all restored).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from helmlm.config import TrainConfig
from helmlm.data.packing import PackedRows, RowStream
from helmlm.data.shards import prepare_data, verify_shards
from helmlm.errors import HelmlmError, NonFiniteLossError, TrainingError  # noqa: F401  (re-exported)
from helmlm.eval import validation_loss
from helmlm.models import HELMForCausalLM
from helmlm.models.modeling import lm_targets, padded_document_ids
from helmlm.models.params import count_parameters
from helmlm.nn.embedding import LorentzEmbedding
from helmlm.nn.routing import balance_step, routed_layers, routing_stats
from helmlm.storage import disk_errors, exclusive
from helmlm.training.allocator import apply_cpu_malloc
from helmlm.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from helmlm.training.distributed import (
    Distributed,
    autocast_dtype,
    average_ignored_gradients,
    clip_gradients,
    full,
    gathered_state,
    init_distributed,
    lost_a_rank,
    on_main_rank,
    shard_euclidean_parts,
    stop_on_sigterm,
    wrap_model,
)
from helmlm.training.metrics import MetricsLog, manifold_health
from helmlm.training.optim import allocate_state, build_optimizer, lr_multiplier
from helmlm.training.recovery import Recovery
from helmlm.training.resume import read_initial_weights, resume_point


class Trainer:
    """Builds data, model and optimizers from a :class:`TrainConfig` and runs :meth:`fit`."""

    def __init__(self, config: TrainConfig, resume: bool | str | Path = False, dist_env: Distributed | None = None,
                 extend: bool = False):
        self.config, t = config, config.train
        self.env = dist_env or init_distributed(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        if self.env.device.type == "cpu":
            apply_cpu_malloc(t.cpu_malloc)
        self.out_dir = Path(config.out_dir)
        self.log_fn = (lambda msg: print(msg, file=sys.stderr, flush=True)) if self.env.is_main else (lambda msg: None)

        # Where the run starts is settled first, so that a refused start writes nothing.
        self.checkpoint, saved = resume_point(config, resume, extend, self.log_fn)
        if t.init_from and self.checkpoint is None and not Path(t.init_from).exists():
            raise TrainingError(f"train.init_from={t.init_from} does not exist; give a checkpoint, a run directory or "
                                "a model directory (helmlm export output)")
        self._load_data(saved)
        self._build_model()
        self.step, self.tokens_seen, self.last_metrics = 0, 0, {}
        self.recovery = Recovery(self)  # train.on_nonfinite
        if self.checkpoint is not None:
            state = load_checkpoint(self.checkpoint, self.model, self.optimizer)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.stream.position = state["data_position"]
            self.last_metrics = state.get("metrics", {})
            self.recovery.load_state(state.get("recovery", {}))
            self.log_fn(f"resumed from {self.checkpoint} (step {self.step}, {self.tokens_seen:,} tokens)")
        if self.env.device.type == "cpu":  # before the first step's activations: see allocate_state
            allocate_state(self.optimizer)
        self.wrapped = wrap_model(self.model, self.env, self.fsdp)
        self.autocast = autocast_dtype(t.precision, self.env.device)

    def _load_data(self, saved: dict[str, Any] | None) -> None:
        """Rank 0 prepares (or reuses) the shards while the others wait; then every rank maps them."""
        t = self.config.train
        on_main_rank(self.env, self._prepare_and_verify_data)
        self.data_dir = Path(self.config.data.dir)
        self.train_rows = PackedRows(self.data_dir, "train", t.seq_len, t.reset_positions)
        self.val_rows = PackedRows(self.data_dir, "val", t.seq_len, t.reset_positions) \
            if self.train_rows.shards.manifest["splits"]["val"].get("tokens", 0) else None
        if self.val_rows is None:
            self.log_fn(f"warning: {self.data_dir} has no validation tokens (data.val_fraction="
                        f"{self.config.data.val_fraction}): validation loss will not be reported")
        self.tokenizer_sha = self.train_rows.shards.manifest["tokenizer"]["sha256"]
        if saved is not None and saved.get("tokenizer_sha256") != self.tokenizer_sha:
            raise TrainingError(f"cannot resume from {self.checkpoint}: its data used another tokenizer "
                                f"({saved.get('tokenizer_sha256', '?')[:12]} vs {self.tokenizer_sha[:12]})")
        self.stream = RowStream(self.train_rows.num_rows, t.seed)

    def _prepare_and_verify_data(self) -> None:
        """Prepare the shards (or reuse them), then check every shard file against the manifest's size and sha256:
        damaged data is named and refused before a step is trained on it."""
        data_dir = prepare_data(self.config.data, progress=self.config.log.progress)
        verify_shards(data_dir)

    def _build_model(self) -> None:
        """Model (same seed on every rank: identical initial weights; ``init_from`` weights loaded before FSDP
        shards the model, which replaces its parameters) and the optimizer split."""
        t = self.config.train
        self.model_config = self._sized_model_config(self.train_rows.shards.vocab_size)
        torch.manual_seed(t.seed)
        self.model = HELMForCausalLM(self.model_config).to(self.env.device)
        self.model.loss_chunk_tokens = t.loss_chunk_tokens
        self.model.model.gradient_checkpointing = t.activation_checkpointing
        if t.compile:
            self.model.model.compile_blocks()
        if t.init_from and self.checkpoint is None:
            self._load_initial_weights(t.init_from)
        if t.table_dtype == "float64":
            for module in self.model.modules():
                if isinstance(module, LorentzEmbedding) and module.manifold_table:
                    module.keep_table_in_float64()
        self.fsdp = self.env.active and t.strategy == "fsdp"
        if self.fsdp:
            shard_euclidean_parts(self.model)
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps,
                                         t.riemannian_lr, t.embedding_lr, t.riemannian_lr_scaling)
        self.routed = bool(routed_layers(self.model))

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

    # ------------------------------------------------------------------------------------------------------------
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed next-token cross-entropy of a micro-batch (fp32) and the routed layers' balance loss."""
        with torch.autocast(self.env.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            out = self.wrapped(batch["input_ids"], labels=batch["input_ids"], document_ids=batch["document_ids"],
                               position_ids=batch["position_ids"], attention_mask=batch["attention_mask"],
                               loss_reduction="sum")
        return out.loss, out.aux_loss

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _count_targets(batch: dict[str, torch.Tensor]) -> int:
        docs = padded_document_ids(batch["document_ids"], batch["attention_mask"])
        return int((lm_targets(batch["input_ids"], docs) != -100).sum())

    def train_step(self) -> dict[str, float]:
        t, env = self.config.train, self.env
        lr_factor = lr_multiplier(self.step, t.steps, t.resolved_warmup(), t.min_lr_ratio) * self.recovery.lr_scale
        self.optimizer.set_lr(lr_factor)
        first_row = self.stream.position
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
            value = loss_value if what == "loss" else norm_value
            raise NonFiniteLossError(f"non-finite {what} ({value}) at step {self.step + 1}; stopped before updating "
                                     f"the parameters; {self.last_good()}",
                                     event={"what": what, "value": str(value), "rows": [first_row,
                                                                                          self.stream.position]})
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

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss and perplexity over the first ``eval.rows`` validation rows (all ranks
        take part); ``{}`` when there is no validation data."""
        if self.val_rows is None:
            return {}
        env = self.env
        return validation_loss(self.wrapped, self.val_rows, self.config.train.micro_batch, self.config.eval.rows,
                               device=env.device, autocast=self.autocast, rank=env.rank, world_size=env.world_size,
                               all_reduce=env.all_reduce)

    def health(self) -> dict[str, Any]:
        """Manifold health: the embedding table's largest constraint violation, expert curvatures."""
        return manifold_health(self.model, self.model_config.curvature)

    def _resume_hint(self) -> str:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return "no checkpoint was written yet: start the run again"
        return f"the newest checkpoint is {ckpt}: continue with the same command and --resume"

    def last_good(self) -> str:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return ("no checkpoint was written yet. Lower train.lr or raise train.warmup_ratio, then start the run "
                    "again (without --resume)")
        return (f"the last good checkpoint is {ckpt}. Lower train.lr or raise train.warmup_ratio, then resume with "
                "--resume")

    def save(self) -> Path | None:
        """Write a checkpoint (every rank takes part, rank 0 writes), unless a parameter is no longer finite: then
        stop, and the previous checkpoint stays the latest."""
        peak = torch.stack([full(p.detach().abs().amax()).float() for p in self.model.parameters()])
        if not torch.isfinite(peak).all():
            raise NonFiniteLossError(f"non-finite parameters after step {self.step}; not saved; {self.last_good()}",
                                     event={"what": "parameters", "value": "nan"})
        model_state, opt_state = gathered_state(self.model, self.optimizer)
        path = None
        if self.env.is_main:
            state = {"config": self.config.to_dict(), "model_config": self.model_config.to_diff_dict(),
                     "data_position": self.stream.position, "tokens_seen": self.tokens_seen,
                     "tokenizer_sha256": self.tokenizer_sha, "metrics": self.last_metrics,
                     "recovery": self.recovery.state()}
            path = save_checkpoint(self.out_dir, self.step, model_state, opt_state, state,
                                   self.config.checkpoint.keep_last)
            with disk_errors("the run's config.json", self.out_dir):
                (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        self.env.barrier()
        return path

    # ------------------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; return the last training and validation metrics. ``tokens_per_s`` is end to end
        (validation and checkpoints included). Rank 0 holds ``out_dir``'s one-writer lock throughout."""
        with contextlib.ExitStack() as hold:
            on_main_rank(self.env, lambda: self._claim_out_dir(hold))
            with stop_on_sigterm(self._stopped_by_signal, quiet_exit=self.env.active):
                try:
                    return self._fit()
                except RuntimeError as err:
                    if isinstance(err, HelmlmError) or not (self.env.active and lost_a_rank(err)):
                        raise
                    # gloo's "[.../pair.cc:553] Connection closed by peer [host]:port. This is typically ..."
                    first = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0]).split(". ")[0][:200]
                    raise TrainingError(f"lost another rank during step {self.step + 1} ({first}); that rank's "
                                        f"error, if it had time to print one, is above; {self._resume_hint()}"
                                        ) from None

    def _claim_out_dir(self, hold: contextlib.ExitStack) -> None:
        """Take ``out_dir``'s lock (:func:`helmlm.storage.exclusive`), then check that no other process started this
        run since :func:`resume_point` looked: the lock makes the check final."""
        hold.enter_context(exclusive(self.out_dir, "this run"))
        if self.checkpoint is None and latest_checkpoint(self.out_dir) is not None:
            raise TrainingError(f"another process wrote checkpoints to {self.out_dir} after this run started; pass "
                                "--resume to continue that run, or choose another out_dir (nothing was overwritten)")

    def _fit(self) -> dict[str, Any]:
        t, main = self.config.train, self.env.is_main
        log = MetricsLog(self.out_dir, self.config.log.tensorboard, self.step if self.checkpoint else None) \
            if main else None
        self.log_fn(self._plan())
        if t.on_nonfinite == "rollback" and latest_checkpoint(self.out_dir) is None:
            self.save()  # something to roll back to
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=not (main and self.config.log.progress), dynamic_ncols=True)
        start, start_tokens = time.perf_counter(), self.tokens_seen
        try:
            while self.step < t.steps:
                try:
                    metrics = self.train_step()
                    self.recovery.step_done(self.step)
                    metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / max(time.perf_counter() - start,
                                                                                      1e-9)
                    self.last_metrics = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_s']:,.0f}", refresh=False)
                    self._on_schedule(metrics, log, bar)
                except NonFiniteLossError as err:  # from the step, or from a checkpoint (non-finite parameters)
                    self.recovery.handle(err, log)
                    bar.n = self.step
                    bar.refresh()
            result = dict(self.last_metrics)
        finally:
            bar.close()
            if log:
                log.close()
        self.log_fn(self._summary(result, time.perf_counter() - start, ran=self.tokens_seen > start_tokens))
        return result

    def _stopped_by_signal(self, name: str) -> TrainingError:
        """The error a SIGTERM becomes (torchrun sends it to every rank when one fails; so do schedulers)."""
        why = " (under torchrun: another rank failed, its error is above)" if self.env.active else ""
        return TrainingError(f"stopped by {name} during step {self.step + 1}{why}; {self._resume_hint()}")

    def close(self) -> None:
        """Leave the process group (a no-op on one process). The DDP wrapper goes first, while the group is still
        registered: otherwise its ``Reducer``, destroyed later with the trainer, holds the group's last reference,
        and gloo's destructor then joins its worker threads while this thread holds the GIL, which a worker may be
        waiting for to release a tensor of the last collective: a rare hang at exit (docs/LOG.md, 2026-12-01).
        Dropped from Python, the group's destructor releases the GIL first."""
        if not (self.env.active and dist.is_initialized()):
            return
        self.wrapped = self.model
        gc.collect()  # the wrapper may sit in reference cycles (its hooks): destroy its Reducer now
        dist.destroy_process_group()

    def _on_schedule(self, metrics: dict[str, Any], log: MetricsLog | None, bar) -> None:
        """After a step: the training record, manifold health, validation and the checkpoint, each on its own
        schedule and all after the last step."""
        cfg = self.config
        last = self.step == cfg.train.steps
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
                if self.env.is_main and cfg.log.progress:
                    bar.write(message, file=sys.stderr)
                else:
                    self.log_fn(message)
        if self.step % cfg.checkpoint.every == 0 or last:
            self.save()

    def _plan(self) -> str:
        """The line that starts a run: model, data, batch and devices."""
        t, c, pack = self.config.train, self.model_config, self.train_rows.stats
        return (f"train: {c.geometry} {c.attention}/{c.ffn}, {count_parameters(c)['total']:,} parameters; "
                f"{pack.tokens:,} train tokens in {pack.rows:,} rows of {t.seq_len} ({pack.efficiency:.1%} filled); "
                f"global batch {t.micro_batch * t.grad_accum * self.env.world_size} rows x {t.steps} steps on "
                f"{self.env.world_size} x {self.env.device.type}")

    def _summary(self, metrics: dict[str, Any], seconds: float, ran: bool) -> str:
        """The line that ends a run: where it stands and where its checkpoint is."""
        parts = [f"step {self.step}/{self.config.train.steps}"]
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
        trainer.close()
