"""The main job (``helmlm demo``, ``make demo``): the whole pipeline end to end on built-in defaults.

Builds the offline English corpus, trains the byte-level BPE, prepares packed shards, then pretrains the tiny HELM-D
and its parameter-matched LLaMA twin on exactly the same tokens (same rows, same order, same schedule), each at its
own tuned learning rates (the ``train:`` section of its preset, docs/quality.md), and prints a table of validation
loss and perplexity. Checkpoints
land in ``<out>/<model>/checkpoints``; a second call resumes (or, when both runs are complete, only prints the
table).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ("helm_d_tiny", "llama_tiny")


def run_demo(out: str | Path = "runs/demo", models: tuple[str, ...] = DEFAULT_MODELS,
             overrides: tuple[str, ...] = (), threads: int = 2) -> list[dict[str, Any]]:
    """Train each of ``models`` with the ``tiny`` recipe (plus ``overrides``); return one result row per model."""
    from helmlm.config import load_train_config
    from helmlm.models.params import count_parameters
    from helmlm.training.checkpoint import latest_checkpoint
    from helmlm.training.trainer import train

    out = Path(out)
    rows = []
    for model in models:
        config = load_train_config("tiny", [f"model={model}", f"out_dir={out / model}",
                                            f"train.threads={threads}", *overrides])
        resume = latest_checkpoint(config.out_dir) is not None
        print(f"\n== {model}: {config.train.steps} steps of {config.train.micro_batch} x {config.train.seq_len} "
              f"tokens{' (resuming)' if resume else ''}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        metrics = train(config, resume=resume)
        model_config = config.model_config()
        rows.append({"model": model, "geometry": model_config.geometry,
                     "params": count_parameters(model_config)["total"], "steps": config.train.steps,
                     "train_tokens": metrics.get("tokens"), "train_loss": metrics.get("loss"),
                     "val_loss": metrics.get("val_loss"), "val_ppl": metrics.get("val_ppl"),
                     "tokens_per_s": metrics.get("tokens_per_s"), "seconds": time.perf_counter() - start,
                     "checkpoint": str(latest_checkpoint(config.out_dir))})
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    lines = ["| model | geometry | params | train tokens | train loss | val loss | val ppl | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['geometry']} | {num(r['params'], ',')} | {num(r['train_tokens'], ',')} | "
                     f"{num(r['train_loss'], '.3f')} | {num(r['val_loss'], '.3f')} | {num(r['val_ppl'], '.1f')} | "
                     f"{num(r['tokens_per_s'], ',.0f')} |")
    return "\n".join(lines)
