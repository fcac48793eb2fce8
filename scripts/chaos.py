#!/usr/bin/env python
"""The chaos loop of docs/reliability.md: one small training run, interrupted again and again by injected faults
and resumed each time with ``--resume``, must end bit-identical to the same run left alone.

The faults, chosen at random (seeded):
- ``sigkill``: SIGKILL at a random moment of the run (start-up, a step, validation, a checkpoint);
- ``sigkill_in_write``: SIGKILL while a checkpoint is being written (the moment its temporary directory appears);
- ``enospc``: the disk fills while a checkpoint is written (a safetensors file fails halfway, through
  tests/faults.py), which must end in one clear error naming the newest intact checkpoint, with exit status 2;
- with ``--rank-deaths N``, N more runs under torchrun (2 processes, DDP or FSDP2 at random, gloo) lose a random
  rank in the middle of a random step: the job must end soon, with its checkpoint intact, and --resume must end
  identical to the uninterrupted job.

After every fault the loop checks that the run directory holds an intact newest checkpoint (or none yet). It prints
one JSON line per fault and a summary line; ``--out`` keeps both runs. Example (the figures in docs/reliability.md):

    .venv/bin/python scripts/chaos.py --faults 30 --rank-deaths 6 --out runs/chaos
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from helmlm.training.checkpoint import find_checkpoint, latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "tests" / "faults.py"
WORDS = ("the of and to in a is that it was for on are as with his they at be this from have or by one had not but "
         "what all were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first").split()


def write_corpus(path: Path, documents: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(documents):
            phrases = [" ".join(rng.choices(WORDS, k=4)) for _ in range(3)]
            f.write(json.dumps({"text": ". ".join(rng.choice(phrases) for _ in range(rng.randint(2, 30)))}) + "\n")
    return path


def run_args(corpus: Path, data: Path, steps: int, every: int) -> list[str]:
    return [f"data.paths={corpus}", "data.source=local", "data.vocab_size=400", "data.val_fraction=0.05",
            f"data.dir={data}", "model.vocab_size=400", "model.num_hidden_layers=1", "train.seq_len=32",
            "train.micro_batch=4", f"train.steps={steps}", "train.lr=3e-3", "train.embedding_lr=null",
            "train.threads=1", f"eval.every={max(1, steps // 3)}", "eval.rows=16", "log.every=1",
            "log.progress=false", "log.tensorboard=false", f"checkpoint.every={every}", "checkpoint.keep_last=2"]


def launch(args: list[str], run: Path, faults: dict) -> subprocess.Popen:
    resume = ["--resume"] if latest_checkpoint(run) is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HELMLM_FAULTS": json.dumps(faults)}
    return subprocess.Popen([sys.executable, str(LAUNCHER), "train", *args, f"out_dir={run}", *resume],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; ``False`` if it ended (or timed out) first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.001)
    return False


def writing(run: Path) -> bool:
    return any((run / "checkpoints").glob(".tmp-step-*"))


def trained_steps(run: Path) -> int:
    """The step of the last training record in ``run``'s metrics (0 when none)."""
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line for line in f.read().splitlines() if b'"kind": "train"' in line]
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def one_fault(kind: str, args: list[str], run: Path, rng: random.Random, every: int) -> dict:
    """Inject one fault into the next attempt of the run; the attempt's outcome."""
    step = latest_checkpoint(run)
    record = {"fault": kind, "from": step.name if step else None}
    if kind == "enospc":
        proc = launch(args, run, {"enospc_save": rng.randint(1, 4)})
        _, stderr = proc.communicate(timeout=600)
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        record.update(exit=proc.returncode, clear_error=last.startswith("error: cannot write checkpoint")
                      and "no space left" in last and "Traceback" not in stderr)
    else:
        proc = launch(args, run, {})
        if kind == "sigkill":  # a few steps on: mid-step, in validation, or in a checkpoint
            target = (int(step.name.split("-")[1]) if step else 0) + rng.randint(1, 2 * every)
            hit = kill_when(proc, lambda: trained_steps(run) >= target, 600)
        else:
            hit = kill_when(proc, lambda: writing(run), 600)
        proc.communicate()
        record.update(exit=proc.returncode, hit=hit)
    # nothing lost: the newest checkpoint, if any, verifies (find_checkpoint falls back past a damaged one)
    newest = latest_checkpoint(run)
    record["intact"] = newest is None or find_checkpoint(run, log=lambda m: None)[0] == newest
    record["reached"] = newest.name if newest else None
    return record


def torchrun(args: list[str], run: Path, faults: dict, resume: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HELMLM_FAULTS": json.dumps(faults)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29300 + os.getpid() % 500), str(LAUNCHER), "train", *args, f"out_dir={run}",
                           *(["--resume"] if resume else [])], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def rank_deaths(n: int, corpus: Path, out: Path, rng: random.Random, steps: int = 12) -> list[dict]:
    """``n`` 2-process jobs (DDP or FSDP2, gloo), each losing a random rank in the middle of a random step: how soon
    the job ends after the death, whether the checkpoint on disk is intact, and whether --resume ends identical to
    the uninterrupted job of the same strategy."""
    straight, records = {}, []
    args = run_args(corpus, out / "data", steps, 4)
    for i in range(n):
        strategy = rng.choice(["ddp", "fsdp"])
        job = [*args, "train.micro_batch=2", f"train.strategy={strategy}"]
        if strategy not in straight:
            straight[strategy] = out / f"straight-{strategy}"
            torchrun(job, straight[strategy], {})
        run, stamp = out / f"rank-death-{i}", out / f"rank-death-{i}.killed"
        rank, step = rng.randint(0, 1), rng.randint(2, steps - 1)
        dead = torchrun(job, run, {"kill_rank": rank, "kill_step": step, "kill_stamp": str(stamp)})
        seconds = time.time() - float(stamp.read_text())
        newest = latest_checkpoint(run)
        intact = newest is None or find_checkpoint(run, log=lambda m: None)[0] == newest
        resumed = torchrun(job, run, {}, resume=newest is not None)
        ta, tb = final_tensors(straight[strategy]), final_tensors(run)
        records.append({"fault": "rank_death", "strategy": strategy, "rank": rank, "step": step,
                        "exit": dead.returncode, "seconds_to_exit": round(seconds, 2),
                        "clear_error": "error: lost another rank" in dead.stderr or "error: stopped by" in dead.stderr,
                        "intact": intact, "resumed": resumed.returncode == 0,
                        "identical": ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)})
        print(json.dumps(records[-1]), flush=True)
    return records


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    return {f"{n}:{k}": v for n in ("model.safetensors", "optimizer.safetensors")
            for k, v in load_file(ckpt / n).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    p.add_argument("--steps", type=int, default=600, help="training steps of the run (default 600; each fault "
                                                           "lets it advance by at most two checkpoints)")
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps (default 5)")
    p.add_argument("--rank-deaths", type=int, default=0, help="2-process torchrun jobs (DDP or FSDP2) that each lose "
                                                                 "a rank mid-step (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (default 0)")
    p.add_argument("--out", default="runs/chaos", help="a new directory for the runs (default runs/chaos)")
    p.add_argument("--corpus", help="a JSONL corpus with a 'text' field (default: a generated one)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"{out} exists and is not empty; choose a new --out")
    corpus = Path(a.corpus) if a.corpus else write_corpus(out / "corpus.jsonl")
    args = run_args(corpus, out / "data", a.steps, a.every)
    straight = subprocess.run([sys.executable, "-m", "helmlm", "train", *args, f"out_dir={out / 'straight'}"],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if straight.returncode != 0:
        print(straight.stderr, file=sys.stderr)
        return 1
    rng, run, records = random.Random(a.seed), out / "chaos", []
    final = f"step-{a.steps:08d}"
    while len(records) < a.faults and getattr(latest_checkpoint(run), "name", None) != final:
        kind = rng.choices(["sigkill", "sigkill_in_write", "enospc"], weights=[5, 3, 2])[0]
        records.append(one_fault(kind, args, run, rng, a.every))
        print(json.dumps(records[-1]), flush=True)
    last = launch(args, run, {})
    _, stderr = last.communicate()
    if last.returncode != 0:
        print(stderr, file=sys.stderr)
        return 1
    ta, tb = final_tensors(out / "straight"), final_tensors(run)
    identical = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    leftovers = [str(q) for q in run.rglob("*") if ".tmp" in q.name]
    deaths = rank_deaths(a.rank_deaths, corpus, out, rng)
    summary = {"faults": len(records) + len(deaths), **{k: sum(r["fault"] == k for r in records)
                                                        for k in ("sigkill", "sigkill_in_write", "enospc")},
               "killed_in_a_checkpoint_write": sum(r["fault"] == "sigkill_in_write" and r["hit"] for r in records),
               "enospc_clear_errors": sum(r.get("clear_error", False) for r in records if r["fault"] == "enospc"),
               "intact_after_every_fault": all(r["intact"] for r in records + deaths), "identical": identical,
               "leftover_temporaries": leftovers, "steps": a.steps, "checkpoint_every": a.every,
               "rank_deaths": len(deaths), "rank_deaths_identical": sum(r["identical"] for r in deaths),
               "rank_deaths_clear_error": sum(r["clear_error"] for r in deaths),
               "max_seconds_to_exit": max((r["seconds_to_exit"] for r in deaths), default=None)}
    print(json.dumps({"summary": summary}), flush=True)
    survived = identical and summary["intact_after_every_fault"] and not leftovers
    return 0 if survived and all(r["identical"] and r["resumed"] for r in deaths) else 1


if __name__ == "__main__":
    sys.exit(main())
