"""What a run records on rank 0: ``metrics.jsonl`` (always) and TensorBoard scalars (:class:`MetricsLog`), and the
manifold health of the model (:func:`manifold_health`: the Lorentz table's constraint violation, expert
curvatures)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import geoopt
import torch

from helmlm.geometry import manifold_violation
from helmlm.nn.embedding import LorentzEmbedding
from helmlm.nn.mice import LorentzExperts
from helmlm.storage import disk_errors
from helmlm.training.distributed import full


def _record(line: str) -> tuple[float, str | None]:
    """``(step, kind)`` of a metrics line; a torn last line (a kill mid-write) or an empty one counts as infinitely
    late, of no kind."""
    try:
        record = json.loads(line)
        return record.get("step", 0), record.get("kind")
    except (json.JSONDecodeError, AttributeError):
        return math.inf, None


class MetricsLog:
    """Rank 0's metrics: ``metrics.jsonl`` (always), TensorBoard scalars (when installed and enabled)."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        self.file = None
        if resume_step is not None and self.path.is_file():  # drop records past the checkpoint we resume from
            self.rewind(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        with disk_errors("the metrics", self.path.parent):
            self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("note: TensorBoard is not installed (pip install 'helmlm[tensorboard]'); logging to "
                      f"{self.path} only", file=sys.stderr)

    def rewind(self, step: int, keep: tuple[str, ...] = ()) -> None:
        """Drop the records after ``step`` (a torn last line too), except those of the kinds in ``keep``."""
        if self.file is not None:
            self.file.flush()
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (record := _record(line))[0] <= step or record[1] in keep]
        tmp = self.path.with_suffix(".tmp")
        with disk_errors("the metrics", self.path.parent):
            try:
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            if self.file is not None:
                self.file.close()
                self.file = open(self.path, "a")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        with disk_errors("the metrics", self.path.parent):
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
        try:
            self.file.close()  # flushes what a full disk refused: that error was reported already
        except OSError:
            pass
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def manifold_health(model: torch.nn.Module, curvature: float) -> dict[str, Any]:
    """For a Lorentz token table, the geodesic radius of its farthest row (``embedding_radius``: float32 Lorentz
    arithmetic loses precision far out, docs/quality.md) and, when it stores points (a ``ManifoldParameter``), their
    largest constraint violation (relative to their scale, fp64); and the curvatures of every MiCE expert bank."""
    out: dict[str, Any] = {}
    embed = model.model.embed
    table = getattr(embed, "weight", None)
    if isinstance(embed, LorentzEmbedding):
        space = table[:, 1:] if embed.manifold_table else table
        norm = torch.linalg.vector_norm(space.double(), dim=-1).max()
        out["embedding_radius"] = (curvature ** 0.5 * torch.asinh(norm / curvature ** 0.5)).item()
    if isinstance(table, geoopt.ManifoldParameter):
        out["embedding_violation"] = manifold_violation(table, curvature, relative_to="scale").max().item()
    curv = {name: full(m.curvatures).tolist() for name, m in model.named_modules() if isinstance(m, LorentzExperts)}
    if curv:
        out["expert_curvatures"] = curv
    return out
