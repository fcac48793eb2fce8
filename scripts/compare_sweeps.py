#!/usr/bin/env python
"""Compare arms of one or several finished sweeps at their best points (docs/quality.md): per arm the final
validation loss on each seed, mean ± std, the per-seed difference to the first arm (same seed: same data order),
issue 32's goal (an arm at or below the first arm's mean + 1 std), and a plot of validation loss against training
tokens (mean over seeds, band from the lowest to the highest seed). Prints markdown. Example:

    .venv/bin/python scripts/compare_sweeps.py runs/sweep/tiny_dense:llama_tiny runs/sweep/tiny_dense:helm_d_tiny \
        --plot docs/quality-tiny-dense.png --title "tiny, 614k tokens"

An arm is ``SWEEP_DIR:MODEL`` or ``SWEEP_DIR:MODEL:VARIANT``, optionally ``=LABEL`` at the end (its name in the
table and the legend); its best point is the sweep's (``results.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from helmlm.training.sweep import mean_std


def arm_runs(spec: str) -> tuple[str, list[dict]]:
    """The label and the runs (one per seed, seed order) of ``SWEEP_DIR:MODEL[:VARIANT][=LABEL]`` at its best
    point."""
    spec, _, given_label = spec.partition("=")
    directory, model, *rest = spec.split(":")
    variant = rest[0] if rest else "base"
    results = json.loads((Path(directory) / "results.json").read_text())
    best = [s for s in results["summary"] if s["model"] == model and s.get("variant", "base") == variant]
    if not best:
        raise SystemExit(f"{directory}: no finished arm {model} / {variant}")
    best = best[0]
    runs = [r for r in results["runs"] if r["model"] == model and r.get("variant", "base") == variant
            and r["lr"] == best["lr"] and r["embedding_lr"] == best["embedding_lr"]]
    label = given_label or (model if variant == "base" else f"{model} / {variant}")
    return label, sorted(runs, key=lambda r: r["seed"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arms", nargs="+", help="SWEEP_DIR:MODEL[:VARIANT][=LABEL]; the first is the baseline")
    parser.add_argument("--plot", type=Path, help="write the curves here (PNG)")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    arms = [arm_runs(a) for a in args.arms]
    base_label, base = arms[0]
    base_by_seed = {r["seed"]: r["val_loss"] for r in base}
    base_values = list(base_by_seed.values())
    bar = statistics.fmean(base_values) + (statistics.stdev(base_values) if len(base_values) > 1 else 0.0)
    print(f"| model | lr | embedding lr | val loss per seed | mean ± std | difference to {base_label}, per seed | "
          f"mean difference | within {base_label}'s mean + 1 std |")
    print("|---|---|---|---|---|---|---|---|")
    for label, runs in arms:
        values = [r["val_loss"] for r in runs]
        per_seed = ", ".join(f"{r['val_loss']:.3f} ({r['seed']})" for r in runs)
        spread = mean_std(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan)
        diffs = [r["val_loss"] - base_by_seed[r["seed"]] for r in runs if r["seed"] in base_by_seed]
        paired = "-" if runs is base else ", ".join(f"{d:+.3f}" for d in diffs)
        mean_diff = "-" if runs is base or not diffs else f"{statistics.fmean(diffs):+.3f}"
        goal = "-" if runs is base else ("yes" if statistics.fmean(values) <= bar else "no")
        elr = "= lr" if runs[0]["embedding_lr"] is None else f"{runs[0]['embedding_lr']:g}"
        print(f"| {label} | {runs[0]['lr']:g} | {elr} | {per_seed} | {spread} | {paired} | {mean_diff} | {goal} |")
    if args.plot:
        plot(arms, args.plot, args.title)
    return 0


def plot(arms: list[tuple[str, list[dict]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in arms:
        curves = [r["curve"] for r in runs if not r["diverged"]]
        length = min(map(len, curves))
        x = [c[1] if c[1] is not None else c[0] for c in curves[0][:length]]
        values = [[c[i][2] for c in curves] for i in range(length)]
        ax.plot(x, [statistics.fmean(v) for v in values], label=f"{label} (lr {runs[0]['lr']:g}, n={len(curves)})")
        ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats / token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
