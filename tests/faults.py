"""Fault injection for the fault-injection suite (tests/test_faults.py) and scripts/chaos.py: runs the ``helmlm``
command line with faults patched in, as described by the JSON in ``$HELMLM_FAULTS``. Works as a script under
``torchrun`` too (``torchrun ... tests/faults.py train ...``). Keys:

- ``"nan_rows": [p, ...]``: the loss of every step whose batches include stream position ``p`` is NaN (a poisoned
  batch: after a rollback past it, training is finite again);
- ``"nan_from_step": k``: every step from ``k`` on has a NaN loss (a run that cannot recover);
- ``"kill_rank": r, "kill_step": k``: rank ``r`` (default 0) SIGKILLs itself in the middle of step ``k`` (after its
  forward pass, before the gradient all-reduce); ``"kill_rows": [p, ...]``: in the middle of the step that reads
  stream position ``p`` (a moment after a rollback, say); ``"kill_stamp": PATH`` records the moment;
- ``"enospc_save": n``: the ``n``-th safetensors file written (1-based) fails with ENOSPC halfway, as a full disk
  would: half of it is on disk;
- ``"eacces_save": n``: the same with a denied permission.

Nothing here is imported by the package: the faults are patched in from outside, into the real code paths.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time


def install(faults: dict, patch=setattr) -> None:
    """Patch the faults in (``patch(owner, name, value)``: ``setattr``, or pytest's ``monkeypatch.setattr`` to undo
    them after a test)."""
    import torch

    import helmlm.training.checkpoint as checkpoint
    from helmlm.training.trainer import Trainer

    forward = Trainer._forward_loss

    def reads(self, positions) -> bool:
        """Whether this step's batches include one of the stream ``positions``."""
        rows = self.config.train.micro_batch * self.config.train.grad_accum * self.env.world_size
        start = self.stream.position - rows  # the stream has advanced past this step's rows already
        return any(start <= p < self.stream.position for p in positions)

    def poisoned(self) -> bool:
        return reads(self, faults.get("nan_rows", ())) or self.step + 1 >= faults.get("nan_from_step", float("inf"))

    def forward_with_faults(self, batch):
        loss, aux = forward(self, batch)
        if self.env.rank == faults.get("kill_rank", 0) and (self.step + 1 == faults.get("kill_step")
                                                             or reads(self, faults.get("kill_rows", ()))):
            if "kill_stamp" in faults:  # when the rank died, for measuring how soon the job ends
                with open(faults["kill_stamp"], "w") as f:
                    f.write(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if poisoned(self):
            loss = loss * torch.tensor(float("nan"))
        return loss, aux

    patch(Trainer, "_forward_loss", forward_with_faults)
    save, calls = checkpoint.save_file, [0]
    failing = {"enospc_save": errno.ENOSPC, "eacces_save": errno.EACCES}

    def save_with_faults(tensors, filename, *args, **kwargs):
        calls[0] += 1
        for key, code in failing.items():
            if faults.get(key) == calls[0]:
                if code == errno.ENOSPC:  # half the file reaches the disk, as on a real full disk
                    with open(filename, "wb") as f:
                        f.write(b"\0" * 1024)
                raise OSError(code, os.strerror(code), str(filename))
        return save(tensors, filename, *args, **kwargs)

    patch(checkpoint, "save_file", save_with_faults)


def main() -> int:
    install(json.loads(os.environ.get("HELMLM_FAULTS", "{}")))
    from helmlm.cli import main as helmlm

    return helmlm(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
