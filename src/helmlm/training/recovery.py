"""What a run does after a non-finite loss, gradient norm or parameter: ``train.on_nonfinite`` (docs/reliability.md).

The trainer never lets a non-finite gradient reach the parameters: it raises :class:`NonFiniteLossError` first
(non-finite parameters are caught when a checkpoint is due). :class:`Recovery` then

- ``stop``: records the event and re-raises (the error names the last good checkpoint);
- ``skip``: drops the step's batches and goes on; stops after ``max_nonfinite`` such steps in a row;
- ``rollback``: restores a checkpoint (weights, optimizer, RNG) but keeps the data stream where it is, so every batch
  read since is skipped, as large pretraining runs do for loss spikes; scales the learning rates by
  ``rollback_lr_scale`` from then on; and rewrites the state of the checkpoint it went back to (the stream position
  and the counters; its weights are untouched) and deletes the abandoned newer ones, so that a run killed later
  resumes on the rolled-back trajectory exactly. A further failure before the run gets past the step that failed
  goes one checkpoint further back (as far as ``checkpoint.keep_last`` allows): the newest one may already hold the
  state that diverges. It stops after ``max_nonfinite`` rollbacks that did not get past the failure.

Every event is a ``nonfinite`` record in ``metrics.jsonl``; the counters travel in the checkpoints
(:meth:`Recovery.state`), so a resumed run decides exactly as the uninterrupted one would.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from helmlm.errors import NonFiniteLossError
from helmlm.training.checkpoint import (
    CheckpointError,
    checkpoint_candidates,
    load_checkpoint,
    update_checkpoint_state,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from helmlm.training.metrics import MetricsLog
    from helmlm.training.trainer import Trainer


class Recovery:
    """The ``train.on_nonfinite`` policy of one :class:`~helmlm.training.trainer.Trainer` and its counters."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.settings = trainer, trainer.config.train
        self.in_a_row = 0  # skipped steps since the last good one
        self.rollbacks = 0  # rollbacks since the run last got past the step that failed
        self.failed_at = 0  # that step
        self.lr_scale = 1.0  # rollback_lr_scale to the power of every rollback so far

    def state(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "failed_at": self.failed_at, "lr_scale": self.lr_scale}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rollbacks, self.failed_at = state.get("rollbacks", 0), state.get("failed_at", 0)
        self.lr_scale = state.get("lr_scale", 1.0)

    def step_done(self, step: int) -> None:
        """After a good step: the skip streak ends; past the step that failed, so does the rollback streak."""
        self.in_a_row = 0
        if self.rollbacks and step >= self.failed_at:
            self.rollbacks = 0

    def handle(self, err: NonFiniteLossError, log: MetricsLog | None) -> None:
        """Record the event, then stop (re-raise), skip or roll back."""
        t, trainer = self.settings, self.trainer
        policy, step = t.on_nonfinite, trainer.step + 1
        event = {**err.event, "action": policy}
        if event["what"] == "parameters" and policy == "skip":
            policy = event["action"] = "stop"  # an update already applied cannot be skipped
        count = 0
        if policy == "skip":
            self.in_a_row += 1
            event["in_a_row"] = count = self.in_a_row
        elif policy == "rollback":
            self.rollbacks, self.failed_at = self.rollbacks + 1, max(self.failed_at, step)
            event["rollbacks"] = count = self.rollbacks
        if count > t.max_nonfinite:
            kind = "non-finite steps in a row" if policy == "skip" else "rollbacks without getting past step " \
                f"{self.failed_at}"
            err = NonFiniteLossError(f"{count} {kind} at step {step} (train.max_nonfinite={t.max_nonfinite}); the "
                                     f"last was a non-finite {event['what']} ({event['value']}); "
                                     f"{trainer.last_good()}")
            event["action"] = policy = "stop"
        if policy == "stop":
            if log:
                log.write("nonfinite", step, event)
            raise err
        if policy == "rollback":
            event.update(self._roll_back(log))
        if log:
            log.write("nonfinite", step, event)
        done = "skipped it" if policy == "skip" else \
            f"rolled back to step {trainer.step}, past {event['skipped_rows']} rows read since, lr x{self.lr_scale:g}"
        trainer.log_fn(f"warning: non-finite {event['what']} ({event['value']}) at step {step}; {done} "
                       f"(train.on_nonfinite={t.on_nonfinite}, {count} of at most {t.max_nonfinite})")

    def _target(self):
        """The checkpoint to go back to: the newest intact one, or for a repeated rollback (the newest is then the
        previous target) the one before it when there is one."""
        trainer, wanted = self.trainer, 1 if self.rollbacks > 1 else 0
        intact = []
        for candidate in checkpoint_candidates(trainer.out_dir):
            try:
                verify_checkpoint(candidate)  # hashes its files: only as many as needed
                intact.append(candidate)
            except CheckpointError as problem:
                trainer.log_fn(f"warning: cannot roll back to {candidate.name}: {problem}")
            if len(intact) > wanted:
                break
        if not intact:
            raise NonFiniteLossError(f"no intact checkpoint in {trainer.out_dir} to roll back to")
        return intact[min(wanted, len(intact) - 1)]

    def _roll_back(self, log: MetricsLog | None) -> dict[str, Any]:
        trainer = self.trainer
        position, target = trainer.stream.position, self._target()
        state = load_checkpoint(target, trainer.model, trainer.optimizer)
        trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
        trainer.last_metrics = state.get("metrics", {})
        trainer.stream.position = position
        self.lr_scale *= self.settings.rollback_lr_scale
        trainer.env.barrier()  # every rank has read the target before rank 0 deletes anything
        if trainer.env.is_main:  # the target now describes the rolled-back run: resuming from it continues exactly
            update_checkpoint_state(target, data_position=position, recovery=self.state())
            for newer in checkpoint_candidates(trainer.out_dir):
                if newer.name > target.name:
                    shutil.rmtree(newer, ignore_errors=True)
        trainer.env.barrier()
        if log:
            log.rewind(trainer.step, keep=("nonfinite",))
        return {"to_step": trainer.step, "skipped_rows": position - state["data_position"],
                "lr_scale": self.lr_scale}
