"""LoRA against HypLoRA (both variants) on seeded arithmetic word problems, each method at its own best lr
(docs/hyplora.md). Resumable: a finished run is kept, a killed one continues from its checkpoint.

    helmlm word-problems runs/hyplora/data --train 300 --val 100 --test 200
    python scripts/hyplora_experiment.py runs/models/smollm2-135m-instruct runs/hyplora/data runs/hyplora/exp

1. **lr sweep** at the first seed: every method x its lrs, trained on train.jsonl; the lr with the best accuracy on
   val.jsonl wins (ties: lower validation loss).
2. **seeds**: the other seeds at each method's best lr.
3. Every run, and the base model without an adapter, is scored on test.jsonl. Writes ``results.json`` and
   ``results.md`` (test accuracy per run; mean and std over seeds at the best lr).

Each run is a ``helmlm finetune`` / ``helmlm finetune-eval`` subprocess with ``--threads``; ``--parallel`` runs go at
once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = {"lora": ["--method", "lora"], "hyplora-paper": ["--method", "hyplora", "--variant", "paper"],
           "hyplora-readme": ["--method", "hyplora", "--variant", "readme"]}


def helmlm(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "helmlm", *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"helmlm {' '.join(argv[:2])} failed:\n{proc.stderr[-3000:]}")


def evaluate(args, adapter: Path | None, split: str, out: Path) -> dict:
    """Accuracy on ``split`` (cached in ``out``)."""
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        cmd = ["finetune-eval", args.base, "--data", str(Path(args.data) / f"{split}.jsonl"), "--kind", "math",
               "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "16", "--threads", str(args.threads),
               "--predictions", str(out.with_suffix(".predictions.jsonl")), "--overwrite"]
        proc = subprocess.run([sys.executable, "-m", "helmlm", *cmd, *(["--adapter", str(adapter)] if adapter else [])],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"finetune-eval failed:\n{proc.stderr[-3000:]}")
        tmp.write_text(proc.stdout.strip().splitlines()[-1] + "\n")
        tmp.replace(out)
    return json.loads(out.read_text())


def run(args, method: str, lr: float, seed: int) -> dict:
    """Train (or finish training) one adapter and score it on val and test."""
    run_dir = Path(args.out) / method / f"lr={lr:g},seed={seed}"
    if not (run_dir / "summary.json").is_file():
        resume = ["--resume"] if (run_dir / "finetune.json").is_file() else []
        helmlm("finetune", args.base, "--data", str(Path(args.data) / "train.jsonl"), "--out", str(run_dir),
               *METHODS[method], "--lr", repr(lr), "--seed", str(seed), "--rank", str(args.rank), "--alpha",
               str(args.alpha), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--eval-data", str(Path(args.data) / "val.jsonl"), "--eval-every", "1000000",
               "--threads", str(args.threads), *resume)
    summary = json.loads((run_dir / "summary.json").read_text())
    val = evaluate(args, run_dir / "adapter", "val", run_dir / "val.json")
    test = evaluate(args, run_dir / "adapter", "test", run_dir / "test.json")
    return {"method": method, "lr": lr, "seed": seed, "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
            "val_loss": summary["final_eval_loss"], "trainable_parameters": summary["trainable_parameters"]}


def table(base: dict, runs: list[dict], best: dict[str, float]) -> str:
    lines = [f"Base model, no adapter: test accuracy {base['accuracy']:.3f} ({base['correct']}/{base['n']}).", "",
             "| method | best lr | trainable parameters | seeds | test accuracy, mean ± std | per seed |",
             "|---|---|---|---|---|---|"]
    for method, lr in best.items():
        at = [r for r in runs if r["method"] == method and r["lr"] == lr]
        accs = [r["test_accuracy"] for r in at]
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        lines.append(f"| {method} | {lr:g} | {at[0]['trainable_parameters']:,} | {len(at)} | "
                     f"{statistics.fmean(accs):.3f} ± {std:.3f} | {', '.join(f'{a:.3f}' for a in accs)} |")
    lines += ["", "lr sweep (first seed): validation accuracy / loss, test accuracy", "",
              "| method | lr | val accuracy | val loss | test accuracy |", "|---|---|---|---|---|"]
    for r in sorted((r for r in runs if r["seed"] == runs[0]["seed"]), key=lambda r: (r["method"], r["lr"])):
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['val_accuracy']:.3f} | {r['val_loss']:.4f} | "
                     f"{r['test_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base"), p.add_argument("data"), p.add_argument("out")
    p.add_argument("--methods", default="lora,hyplora-paper,hyplora-readme")
    p.add_argument("--lora-lrs", default="1e-4,3e-4,1e-3")
    p.add_argument("--hyplora-lrs", default="3e-4,1e-3,3e-3,1e-2")  # 3e-3 won the first grid: one step above
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rank", type=int, default=8), p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--epochs", type=int, default=3), p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1), p.add_argument("--parallel", type=int, default=2)
    args = p.parse_args()
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = {m: [float(x) for x in (args.lora_lrs if m == "lora" else args.hyplora_lrs).split(",")] for m in methods}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        base = pool.submit(evaluate, args, None, "test", Path(args.out) / "base-test.json")
        grid = list(pool.map(lambda point: run(args, *point), [(m, lr, seeds[0]) for m in methods for lr in lrs[m]]))
        best = {m: max((r for r in grid if r["method"] == m), key=lambda r: (r["val_accuracy"], -r["val_loss"]))["lr"]
                for m in methods}
        more = list(pool.map(lambda point: run(args, *point), [(m, best[m], s) for m in methods for s in seeds[1:]]))
        base = base.result()
    runs = grid + more
    (Path(args.out) / "results.json").write_text(json.dumps({"base": base, "best_lr": best, "runs": runs}, indent=1))
    (Path(args.out) / "results.md").write_text(table(base, runs, best))
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
