"""Learning-rate sweeps for fair model comparisons (``helmlm sweep CONFIG``).

A sweep trains every model of a list on the same data in the same order (one training recipe, one data seed per
run seed) in two stages:

1. **grid**: every ``(lr, embedding_lr)`` pair of the grid, at the first seed;
2. **seeds**: every further seed at each model's best grid point (lowest final validation loss).

``variants`` (named lists of overrides; default one, ``base``, with none) multiply the models into arms, each
swept and seeded on its own: an ablation is a variant, compared with ``base`` at the same budget.

Each run is an ordinary ``helmlm train`` run in its own directory (``runs/<model>/<point>``), started as a
subprocess with a fixed number of torch threads, so a run's numbers do not depend on how many runs go at once.
A finished run leaves ``result.json``; a run that was killed resumes from its last checkpoint (exact resume), so a
killed sweep continues where it stopped and ends with the same table. A run that diverges (non-finite loss) is
recorded as diverged, not retried.

Outputs in ``out_dir``: ``sweep.json`` (the sweep's own spec: a directory holding another sweep is refused),
``results.json`` (every run: its point, final validation loss and bits per byte, the validation curve),
``results.md`` (the grid per model, and mean +- std over seeds at each model's best point) and ``curves.png``
(validation loss against training tokens at the best points, the band spanning the seeds).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from helmlm.config import load_train_config, resolve_shipped
from helmlm.errors import ConfigError, TrainingError
from helmlm.storage import disk_errors, exclusive, is_bookkeeping
from helmlm.training.checkpoint import latest_checkpoint

SPEC_FILE, RESULTS_FILE, TABLE_FILE, CURVES_FILE, RUN_RESULT = (
    "sweep.json", "results.json", "results.md", "curves.png", "result.json")


@dataclass
class SweepSpec:
    """What a sweep config holds (YAML keys of the same names). ``embedding_lr`` values may be ``null``: the
    token table then trains at the run's ``lr``. ``lr`` and ``embedding_lr`` are one grid for every model, or a
    mapping from each model to its own grid (``embedding_lr: {helm_d_tiny: [0.01], llama_tiny: [0.1]}``: each model
    at its tuned point). ``overrides`` apply to every run (``section.key=value``),
    ``model_overrides[model]`` to that model's runs (e.g. to keep a pair's parameter counts matched), and
    ``variants[name]`` to that variant's runs, after the point's lr and seed (so a variant may also set them).
    ``nproc > 1`` runs each training run under ``torchrun`` with that many processes (DDP, or FSDP with
    ``train.strategy=fsdp``; one GPU each where there are GPUs). Each process takes ``train.micro_batch`` rows, so
    the global batch is ``nproc`` times the recipe's unless the overrides divide ``train.micro_batch``."""

    recipe: str
    models: list[str]
    lr: list[float] | dict[str, list[float]]
    embedding_lr: list[float | None] | dict[str, list[float | None]] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [1234])
    overrides: list[str] = field(default_factory=list)
    model_overrides: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=lambda: {"base": []})
    out_dir: str = "runs/sweep"
    threads: int = 1
    parallel: int = 1
    nproc: int = 1

    def validate(self) -> None:
        for name in ("models", "seeds"):
            _check_list(name, getattr(self, name))
        for name in ("lr", "embedding_lr"):
            grids = getattr(self, name)
            if isinstance(grids, dict) and set(grids) != set(self.models):
                raise ConfigError(f"sweep: {name} maps models to grids, so it needs exactly the sweep's models "
                                  f"{self.models}; got {sorted(grids)}")
            for model in self.models:
                _check_list(name if not isinstance(grids, dict) else f"{name}[{model}]", self.grid_of(name, model))
        for model in self.models:
            if any(not isinstance(v, (int, float)) or not v > 0 for v in self.grid_of("lr", model)):
                raise ConfigError(f"sweep: every lr must be a number > 0, got {self.lr}")
            if any(v is not None and (not isinstance(v, (int, float)) or not v > 0)
                   for v in self.grid_of("embedding_lr", model)):
                raise ConfigError(f"sweep: every embedding_lr must be a number > 0 or null, got {self.embedding_lr}")
        for name in ("threads", "parallel", "nproc"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"sweep: {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.model_overrides, dict) or set(self.model_overrides) - set(self.models):
            raise ConfigError(f"sweep: model_overrides must map models of the sweep to lists of overrides, got "
                              f"{self.model_overrides!r}")
        if not isinstance(self.variants, dict) or not self.variants or \
                any(not isinstance(v, list) for v in self.variants.values()):
            raise ConfigError(f"sweep: variants must map names to lists of overrides, got {self.variants!r}")
        for model in self.models:  # unknown presets, keys and values fail here, with suggestions
            for extra in self.variants.values():
                load_train_config(self.recipe, [*self.run_overrides(model), *extra])

    def grid_of(self, name: str, model: str) -> list[Any]:
        """``model``'s values of ``lr`` or ``embedding_lr``: the shared grid, or its own."""
        grids = getattr(self, name)
        return grids.get(model) if isinstance(grids, dict) else grids

    def arms(self) -> list[tuple[str, str]]:
        """``(model, variant)`` pairs, each swept and seeded on its own."""
        return [(model, variant) for model in self.models for variant in self.variants]

    def run_overrides(self, model: str) -> list[str]:
        """The overrides of every run of ``model``, before its point's (lr, embedding lr, seed)."""
        return [f"model={model}", *self.overrides, *self.model_overrides.get(model, [])]

    def identity(self) -> dict[str, Any]:
        """What decides the runs' results (not where they run, nor how many at once)."""
        spec = asdict(self)
        for key in ("out_dir", "parallel"):
            spec.pop(key)
        return spec


def _check_list(name: str, values: Any) -> None:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep: {name} must be a non-empty list, got {values!r}")
    if len(set(map(str, values))) != len(values):
        raise ConfigError(f"sweep: {name} lists a value twice: {values}")


SWEEPS_DIR = Path(__file__).resolve().parent.parent / "presets" / "sweeps"


def resolve_sweep(name_or_path: str | Path) -> Path:
    """A sweep YAML path, or the shipped sweep of that name (``helmlm sweep tiny_dense``)."""
    return resolve_shipped(name_or_path, SWEEPS_DIR, "sweep config", "sweep", "shipped")


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """A :class:`SweepSpec` from a YAML file (or a shipped sweep's name), with ``key=value`` overrides of its
    top-level keys (YAML values: ``lr=[1e-3,3e-3]``)."""
    path = resolve_sweep(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep config is a mapping of keys (recipe, models, lr, ...)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"sweep override {item!r} is not key=value")
        raw[key] = yaml.safe_load(value)
    known = set(SweepSpec.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = sorted(k for k in ("recipe", "models", "lr") if k not in raw)
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    if isinstance(raw.get("overrides"), str):
        raw["overrides"] = raw["overrides"].split()
    spec = SweepSpec(**raw)
    spec.validate()
    return spec


@dataclass(frozen=True)
class Point:
    model: str
    lr: float
    embedding_lr: float | None
    seed: int
    variant: str = "base"

    @property
    def name(self) -> str:
        elr = "lr" if self.embedding_lr is None else f"{self.embedding_lr:g}"
        prefix = "" if self.variant == "base" else f"{self.variant},"
        return f"{prefix}lr={self.lr:g},elr={elr},seed={self.seed}"

    def overrides(self) -> list[str]:
        elr = "null" if self.embedding_lr is None else repr(self.embedding_lr)
        return [f"train.lr={self.lr!r}", f"train.embedding_lr={elr}", f"train.seed={self.seed}"]


class Sweep:
    """Runs a :class:`SweepSpec` (see the module docstring). ``max_runs``: start at most this many runs in this
    call (then stop; calling again continues), for sweeps done in pieces."""

    def __init__(self, spec: SweepSpec, log=print):
        self.spec, self.out, self.log = spec, Path(spec.out_dir), log
        self._bytes_per_token: float | None = None

    def run_dir(self, point: Point) -> Path:
        return self.out / "runs" / point.model / point.name

    def claim_out_dir(self) -> None:
        """Create ``out_dir`` with ``sweep.json``, or check that the one there describes this sweep."""
        spec_file = self.out / SPEC_FILE
        if spec_file.is_file():
            held = {**_default_identity(), **json.loads(spec_file.read_text())}  # keys added since: their defaults
            if held != self.spec.identity():
                changed = sorted(k for k in set(held) | set(self.spec.identity())
                                 if held.get(k) != self.spec.identity().get(k))
                raise ConfigError(f"{self.out} holds a different sweep (differs in: {', '.join(changed)}); choose "
                                  "another out_dir, or restore the sweep config it was started with")
        elif self.out.exists() and any(not is_bookkeeping(p) for p in self.out.iterdir()):
            raise ConfigError(f"{self.out} exists and is not a sweep directory (no {SPEC_FILE}); choose another "
                              "out_dir")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(spec_file, self.spec.identity())

    def grid(self) -> list[Point]:
        s = self.spec
        return [Point(m, lr, elr, s.seeds[0], v) for m, v in s.arms() for lr in s.grid_of("lr", m)
                for elr in s.grid_of("embedding_lr", m)]

    def result(self, point: Point) -> dict[str, Any] | None:
        path = self.run_dir(point) / RUN_RESULT
        return {"variant": "base", **json.loads(path.read_text())} if path.is_file() else None

    def best(self, arm: tuple[str, str]) -> Point:
        """The grid point of the arm ``(model, variant)`` with the lowest final validation loss (ties: the first in
        grid order)."""
        points = [p for p in self.grid() if (p.model, p.variant) == arm]
        losses = [self.result(p)["val_loss"] for p in points]
        return min(zip(losses, range(len(points)), points))[2]

    def seed_points(self) -> list[Point]:
        return [Point(b.model, b.lr, b.embedding_lr, seed, b.variant) for b in map(self.best, self.spec.arms())
                for seed in self.spec.seeds[1:]]

    def run(self, max_runs: int | None = None) -> dict[str, Any]:
        """Run what is missing (grid, then seeds), then write the results, table and curves; return the results."""
        with exclusive(self.out, "this sweep"):
            return self._run(max_runs)

    def _run(self, max_runs: int | None) -> dict[str, Any]:
        self.claim_out_dir()
        self.bytes_per_token()  # prepares the data once, before runs that would otherwise race to prepare it
        budget = [math.inf if max_runs is None else max_runs]
        for stage in (self.grid, self.seed_points):
            todo = [p for p in stage() if self.result(p) is None]
            self._run_points(todo, budget)
            if any(self.result(p) is None for p in stage()):
                self.log(f"stopped after --max-runs {max_runs}; run the same command again to continue")
                return self.write_outputs(complete=False)
        return self.write_outputs(complete=True)

    def _run_points(self, points: list[Point], budget: list[float]) -> None:
        points = points[: int(min(len(points), budget[0]))]
        budget[0] -= len(points)
        with ThreadPoolExecutor(max_workers=self.spec.parallel) as pool:
            for future in [pool.submit(self._train, p, i, len(points)) for i, p in enumerate(points)]:
                future.result()

    def _train(self, point: Point, index: int, total: int) -> None:
        run_dir = self.run_dir(point)
        resume = latest_checkpoint(run_dir) is not None  # killed before its first checkpoint: start it again
        self.log(f"[{index + 1}/{total}] {point.model} {point.name}{' (resuming)' if resume else ''}")
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.spec.nproc}"] \
            if self.spec.nproc > 1 else []
        argv = [sys.executable, *launcher, "-m", "helmlm", "train", self.spec.recipe,
                *self.spec.run_overrides(point.model), *point.overrides(), *self.spec.variants[point.variant],
                f"out_dir={run_dir}", f"train.threads={self.spec.threads}", "log.progress=false"]
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(self.spec.threads)}
        proc = subprocess.run(argv + (["--resume"] if resume else []), capture_output=True, text=True, env=env,
                              check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 and not _diverged(proc.stderr):
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
            detail = errors[-1][len("error: "):] if errors else "\n" + proc.stderr[-2000:]  # the trainer's own message
            raise TrainingError(f"run {run_dir} failed (exit {proc.returncode}): {detail}\nThe runs finished so far "
                                "are kept: run the same sweep command again to go on")
        result = self._collect(point, run_dir, diverged=proc.returncode != 0)
        if result["diverged"]:
            result["error"] = proc.stderr.strip().splitlines()[-1]  # the trainer's message: what and at which step
        result["seconds"] = seconds
        _write_json(run_dir / RUN_RESULT, result)

    def _collect(self, point: Point, run_dir: Path, diverged: bool) -> dict[str, Any]:
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        evals = {r["step"]: r["val_loss"] for r in rows if r.get("kind") == "eval"}  # a resumed run may repeat one
        tokens = {r["step"]: r["tokens"] for r in rows if r.get("kind") == "train" and "tokens" in r}
        per_step = max(tokens.values()) / max(tokens) if tokens else math.nan  # every step trains the same rows
        curve = [[step, round(step * per_step) if math.isfinite(per_step) else None, loss]
                 for step, loss in sorted(evals.items())]
        final = curve[-1][2] if curve and not diverged else math.inf
        return {**asdict(point), "run": str(run_dir), "diverged": diverged, "val_loss": final,
                "val_bpb": final / math.log(2) / self.bytes_per_token() if math.isfinite(final) else math.inf,
                "curve": curve}

    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token of the validation split (bits per byte = loss / ln 2 / this)."""
        if self._bytes_per_token is None:
            from helmlm.data.shards import documents_of_split, prepare_data

            config = load_train_config(self.spec.recipe, self.spec.run_overrides(self.spec.models[0]))
            manifest = json.loads((prepare_data(config.data, progress=False) / "manifest.json").read_text())
            tokens = manifest["splits"]["val"]["tokens"] - manifest["splits"]["val"]["documents"]  # less the EOS
            n_bytes = sum(len(d.encode("utf-8")) for d in documents_of_split(config.data, "val"))
            self._bytes_per_token = n_bytes / max(tokens, 1)
        return self._bytes_per_token

    def write_outputs(self, complete: bool) -> dict[str, Any]:
        runs = [r for p in self.grid() + (self.seed_points() if complete else []) if (r := self.result(p))]
        runs = list({r["run"]: r for r in runs}.values())
        summary = summarise(runs, self.spec) if complete else []
        results = {"complete": complete, "spec": self.spec.identity(), "summary": summary,
                   "runs": [{k: v for k, v in r.items() if k != "seconds"} for r in runs],
                   "seconds": {r["run"]: r.get("seconds") for r in runs}}
        _write_json(self.out / RESULTS_FILE, results)
        with disk_errors(TABLE_FILE, self.out, then="run the same sweep command again to write it"):
            (self.out / TABLE_FILE).write_text(markdown_table(runs, summary, self.spec))
            if complete:
                plot_curves(summary, runs, self.out / CURVES_FILE, self.log)
        return results


def _default_identity() -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(SweepSpec)
            if (f.default is not MISSING or f.default_factory is not MISSING) and f.name not in ("out_dir", "parallel")}


def _diverged(stderr: str) -> bool:
    return "non-finite" in stderr or "NaN" in stderr


def summarise(runs: list[dict[str, Any]], spec: SweepSpec) -> list[dict[str, Any]]:
    """Per arm (model, variant): its best grid point and the mean, standard deviation (n - 1) and count over seeds
    there."""
    rows = []
    for model, variant in spec.arms():
        arm = [r for r in runs if (r["model"], r["variant"]) == (model, variant)]
        grid = [r for r in arm if r["seed"] == spec.seeds[0]]
        best = min(grid, key=lambda r: (r["val_loss"], grid.index(r)))
        at_best = [r for r in arm if r["lr"] == best["lr"] and r["embedding_lr"] == best["embedding_lr"]]
        losses, bpbs = [r["val_loss"] for r in at_best], [r["val_bpb"] for r in at_best]
        rows.append({"model": model, "variant": variant, "lr": best["lr"], "embedding_lr": best["embedding_lr"],
                     "seeds": len(at_best),
                     "val_loss_mean": statistics.fmean(losses), "val_loss_std": _std(losses),
                     "val_bpb_mean": statistics.fmean(bpbs), "val_bpb_std": _std(bpbs)})
    return rows


def _std(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) == len(values) and len(values) > 1 else math.nan


def mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std``, or the mean alone where there is no spread (one seed, or a diverged one: ``std`` is NaN)."""
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(runs: list[dict[str, Any]], summary: list[dict[str, Any]], spec: SweepSpec) -> str:
    def elr(v: float | None) -> str:
        return "= lr" if v is None else f"{v:g}"

    def loss(r: dict[str, Any] | None) -> str:
        return "-" if r is None else ("diverged" if r["diverged"] else f"{r['val_loss']:.3f}")

    def arm(model: str, variant: str) -> str:
        return model if list(spec.variants) == ["base"] else f"{model} / {variant}"

    lines = []
    if summary:
        lines += [f"Final validation loss at each model's best grid point, mean ± std over seeds ({spec.recipe}).", "",
                  "| model | lr | embedding lr | seeds | val loss | val bits per byte |", "|---|---|---|---|---|---|"]
        for s in summary:
            lines.append(f"| {arm(s['model'], s['variant'])} | {s['lr']:g} | {elr(s['embedding_lr'])} | "
                         f"{s['seeds']} | {mean_std(s['val_loss_mean'], s['val_loss_std'], 3)} | "
                         f"{mean_std(s['val_bpb_mean'], s['val_bpb_std'], 4)} |")
        lines.append("")
    lines += [f"Grid (seed {spec.seeds[0]}): final validation loss, rows lr, columns embedding lr.", ""]
    by_point = {(r["model"], r["variant"], r["lr"], r["embedding_lr"]): r for r in runs if r["seed"] == spec.seeds[0]}
    for model, variant in spec.arms():
        elrs = spec.grid_of("embedding_lr", model)
        lines += [f"**{arm(model, variant)}**", "", "| lr | " + " | ".join(elr(e) for e in elrs) + " |",
                  "|---" * (len(elrs) + 1) + "|"]
        for lr in spec.grid_of("lr", model):
            cells = [loss(by_point.get((model, variant, lr, e))) for e in elrs]
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(summary: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, log=print) -> None:
    """Validation loss against training tokens at each model's best point: the mean over seeds, and a band from the
    lowest to the highest seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no {path.name} (pip install 'helmlm[plots]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        curves = [r["curve"] for r in runs if (r["model"], r["variant"]) == (s["model"], s["variant"])
                  and r["lr"] == s["lr"] and r["embedding_lr"] == s["embedding_lr"] and not r["diverged"]]
        if not curves:
            continue
        length = min(map(len, curves))
        x = [c[1] if c[1] is not None else c[0] for c in curves[0][:length]]
        values = [[c[i][2] for c in curves] for i in range(length)]
        name = s["model"] if s["variant"] == "base" else f"{s['model']} / {s['variant']}"
        ax.plot(x, [statistics.fmean(v) for v in values], label=f"{name} (lr {s['lr']:g}, n={len(curves)})")
        ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_errors(path.name, path.parent, then="the runs finished so far are kept: run the same sweep "
                                                       "command again to go on"):
            tmp.write_text(json.dumps(obj, indent=1) + "\n")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
