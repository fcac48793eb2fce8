#!/usr/bin/env python
"""The paired ablation table of a sweep with variants (docs/quality.md): per variant, the final validation loss over
seeds and its per-seed difference to the ``base`` variant (same seed: same data order, same initialisation of the
unchanged parts), from the ``result.json`` files of finished runs, so it also reads a sweep that is not complete.
Prints markdown. Example:

    .venv/bin/python scripts/ablation_table.py runs/sweep/tiny_helm_d_ablations
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--base", default="base", help="the variant the others are compared with")
    args = parser.parse_args()
    spec = json.loads((args.sweep_dir / "sweep.json").read_text())
    seeds, variants = spec["seeds"], list(spec.get("variants", {"base": []}))
    losses: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for path in sorted(args.sweep_dir.glob("runs/*/*/result.json")):
        r = json.loads(path.read_text())
        losses[r["model"], r.get("variant", "base")][r["seed"]] = r["val_loss"]
    print(f"| model | variant | seeds | val loss, mean ± std | difference to {args.base}, per seed "
          f"({', '.join(map(str, seeds))}) | mean difference |")
    print("|---|---|---|---|---|---|")
    for model in spec["models"]:
        base = losses[model, args.base]
        for variant in variants:
            runs = losses[model, variant]
            values = [runs[s] for s in seeds if s in runs]
            if not values:
                continue
            if not all(map(math.isfinite, values)):  # a run that diverged has no final loss
                print(f"| {model} | {variant} | {len(values)} | diverged | - | - |")
                continue
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else " (1 seed)"
            diffs = [runs[s] - base[s] for s in seeds if s in runs and s in base]
            paired = "-" if variant == args.base or not diffs else ", ".join(f"{d:+.3f}" for d in diffs)
            mean = "-" if variant == args.base or not diffs else f"{statistics.fmean(diffs):+.3f}"
            loss = f"{statistics.fmean(values):.3f}{spread}"
            print(f"| {model} | {variant} | {len(values)} | {loss} | {paired} | {mean} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
