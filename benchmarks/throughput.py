#!/usr/bin/env python
"""CPU throughput and memory benchmark: a HELM model against its parameter-matched Euclidean twin (HELM-D vs
LLaMA by default; HELM-MiCE vs the DeepSeek-style MLA + MoE twin with ``--config`` below).

For every (sequence length, mode, config) the script measures training or inference throughput in tokens/s and
the resident memory the run needs, and prints one JSON line per measurement on stdout (progress and a readable
summary go to stderr). A final JSON line with ``"summary": true`` gives the tokens/s ratio of the first config to
the second per (seq_len, mode) and, per model, the growth of the eval activation memory from the smallest to the
largest sequence length.

What is measured
    * ``train``: forward + next-token loss (labels = inputs) + backward + ``torch.optim.AdamW`` step (fused where
      the trainer's is: ``helmlm.training.optim.adamw``), on random tokens; ``eval``: forward only
      (logits), under ``torch.inference_mode``.
    * ``tokens_per_s = batch * seq_len * steps / elapsed``, timed over ``--steps`` steps after ``--warmup``
      untimed ones (``step_ms_median`` is the median step time, less sensitive to a busy machine).
    * Memory: every measurement runs in its own process, because the peak RSS is a process-wide high-water mark.
      By default (``--isolation exec``) the script re-invokes itself in a fresh interpreter with a hidden
      ``--single`` flag and relays the child's JSON line; ``--isolation fork`` imports torch and helmlm once and
      forks a child per measurement instead (saves the ~5 s of imports per run; used by the test).
      In the child, ``baseline_rss_mb`` is the RSS after building the model (and optimizer), collecting garbage
      and ``malloc_trim`` (so cached build temporaries are not counted), before the first step; the kernel's
      high-water mark (``VmHWM``) is then reset (``/proc/self/clear_refs``), so ``peak_rss_mb`` is the peak over
      the warm-up and timed steps only (where the reset is not possible, the process-lifetime ``ru_maxrss`` is
      used; ``peak_rss_source`` says which). ``activation_mb = peak - baseline``. ``peak_rss_timed_mb`` is the
      peak over the timed steps alone (the high-water mark reset again after the warm-up): without the warm-up's
      one-off costs, above all the compilation with ``--compile``, whose memory stays counted in ``peak_rss_mb``.
      In ``train`` mode it also contains AdamW's two moment buffers, created before the first step as the trainer
      does on CPU (``allocate_state``), but not the gradients, allocated in each step's backward;
      ``grad_optimizer_mb`` is their analytic size together (3 x parameter bytes) for reference. With ``--compile``
      the compilation runs in the first warm-up step, so its memory is counted too.
    * Configs are interleaved (for each seq_len, for each mode, for each repeat, for each config), so that load
      from other processes affects the compared models alike; with ``--repeat N`` the line reports the run with
      the best tokens/s (all runs' values are in ``tokens_per_s_runs``).
    * Routed (MoE) models: after the timed steps, one routed layer (MiCE or MoE) is timed alone on an input of
      the step's shape (``batch * seq_len`` tokens; forward + backward in ``train`` mode, forward in ``eval``), and
      ``moe_time_share = moe_layers * moe_layer_ms / step_ms_median`` estimates the routed layers' share of a
      step. ``--moe-dispatch dense`` runs every expert on every token instead of the grouped kernel.

Each line carries the ``command`` that reproduces it. Numbers taken while other processes use the CPU are
provisional: ``loadavg_1m`` (at the start of each run), ``cpu_s`` (process CPU time over the timed steps) and
``involuntary_ctx_switches`` (preemptions during the timed steps) show how contended the run was. With several
threads on a shared machine every parallel op waits for its slowest thread, which penalises models that run many
small ops (HELM-D's Lorentz operations) far more than matmul-bound ones; compare with ``--threads 1``.

Usage (from the repository root)::

    # the default comparison: helm_d_small vs llama_small, seq_len 256 and 1024, train and eval, batch 8
    .venv/bin/python benchmarks/throughput.py --threads 2

    # quick look on the tiny presets, eval only, best of 3
    .venv/bin/python benchmarks/throughput.py --config configs/helm_d_tiny.yaml configs/llama_tiny.yaml \\
        --seq-len 64 256 --mode eval --steps 5 --warmup 1 --repeat 3

    # bf16 autocast, torch.compile, and keep only the summary line
    .venv/bin/python benchmarks/throughput.py --bf16 --compile | grep '"summary": true'

    # HELM-MiCE against its DeepSeek-style twin, with the routed layers' time share
    .venv/bin/python benchmarks/throughput.py --threads 2 --repeat 3 \
        --config configs/helm_mice_small.yaml configs/deepseek_small.yaml

Acceptance criteria this benchmark checks (reported under ``criteria`` in the summary): the first model's train
tokens/s is at least 0.8 x its twin's (HELM-D) or 0.75 x (HELM-MiCE, when the first config is routed), and the
eval activation memory grows roughly linearly in the sequence length (about 4x from 256 to 1024, not about 16x;
the check passes below ``ratio ** 1.5``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from harness import log

DEFAULT_CONFIGS = ["configs/helm_d_small.yaml", "configs/llama_small.yaml"]
MIN_TRAIN_RATIO = {"dense": 0.8, "moe": 0.75}  # HELM-D vs LLaMA; HELM-MiCE vs the DeepSeek-style twin


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokens/s and peak RSS of HELM models on CPU; one JSON line per (config, seq_len, mode).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS, metavar="PATH",
                        help="model YAML files (configs/*.yaml); ratios are first / second")
    parser.add_argument("--seq-len", nargs="+", type=int, default=[256, 1024], metavar="INT")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", nargs="+", choices=("train", "eval"), default=["train", "eval"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before timing (default: 1, or 3 with --compile, whose first steps after "
                             "compiling are still slow)")
    parser.add_argument("--threads", type=int, default=_available_cores(),
                        help="torch.set_num_threads (default: all cores available to this process)")
    parser.add_argument("--bf16", action="store_true", help="run under CPU autocast to bfloat16")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block, as train.compile=true does (compilation in warm-up)")
    parser.add_argument("--loss-chunk", type=int, default=0, metavar="TOKENS",
                        help="train: the loss over this many tokens at a time, no full logits "
                             "(train.loss_chunk_tokens)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="train: recompute each block in backward (train.activation_checkpointing=true)")
    parser.add_argument("--cpu-malloc", choices=("keep", "system"), default="keep",
                        help="glibc malloc policy of each measurement, as train.cpu_malloc (default: %(default)s, "
                             "the trainer's: freed memory kept for the next step)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best tokens/s is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the random tokens")
    parser.add_argument("--moe-dispatch", choices=("auto", "grouped", "dense"), default=None,
                        help="override the config's moe_dispatch for routed models")
    parser.add_argument("--isolation", choices=("exec", "fork"), default="exec",
                        help="how each measurement gets its own process: 'exec' re-runs this script in a fresh "
                             "interpreter (pristine, ~5 s of imports per run); 'fork' imports torch/helmlm once "
                             "and forks a child per run (fast; same peak-RSS accounting)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # child: one measurement
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "threads", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup is None:
        args.warmup = 3 if args.compile else 1
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.loss_chunk < 0:
        parser.error(f"--loss-chunk must be >= 0, got {args.loss_chunk}")
    if any(n < 2 for n in args.seq_len):
        parser.error("--seq-len values must be >= 2 (the loss predicts token t+1 from token t)")
    for name in ("config", "seq_len"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            parser.error(f"--{name.replace('_', '-')} has duplicates: {values}")
    for path in args.config:
        if not Path(path).is_file():
            parser.error(f"config file not found: {path}")
    if args.single and (len(args.config) != 1 or len(args.seq_len) != 1 or len(args.mode) != 1):
        parser.error("--single takes exactly one --config, --seq-len and --mode")
    return args


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_name(path: str) -> str:
    """The preset's ``model.name`` from its YAML, else the file stem."""
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        name = data.get("model", data).get("name")
        if name:
            return str(name)
    except Exception:  # a broken file is reported by the child, with the loader's message
        pass
    return Path(path).stem


def _shell_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (short, copy-pasteable commands)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def reproduce_command(args: argparse.Namespace, config: str, seq_len: int, mode: str) -> str:
    """The public command that runs exactly this measurement (its output also has a summary line)."""
    cmd = [_shell_path(sys.executable), _shell_path(os.path.abspath(__file__)), "--config", config,
           "--seq-len", str(seq_len), "--mode", mode, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.repeat > 1:
        cmd += ["--repeat", str(args.repeat)]
    if args.isolation != "exec":
        cmd += ["--isolation", args.isolation]
    cmd += _option_flags(args)
    return shlex.join(cmd)


def _option_flags(args: argparse.Namespace) -> list[str]:
    """The measurement options of ``args`` as command-line flags (for the child and the reproduce command)."""
    cmd = ["--bf16"] * args.bf16 + ["--compile"] * args.compile
    cmd += ["--loss-chunk", str(args.loss_chunk)] if args.loss_chunk else []
    cmd += ["--activation-checkpointing"] * args.activation_checkpointing
    cmd += ["--cpu-malloc", args.cpu_malloc] if args.cpu_malloc != "keep" else []
    return cmd + (["--moe-dispatch", args.moe_dispatch] if args.moe_dispatch else [])


# ------------------------------------------------------------------------------------------------ child side
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    kb = _proc_status_kb("VmRSS")
    if kb is None:  # no procfs: the best available stand-in
        return ru_maxrss_mb()
    return kb / 1024


def ru_maxrss_mb() -> float:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux


def release_free_heap() -> bool:
    """Hand memory that is freed but still cached by glibc's malloc back to the OS (``malloc_trim``), so that the
    baseline RSS counts live memory only, not temporaries of the model build that later steps would reuse."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc
        return False


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0); True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kb("VmHWM"), _proc_status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # within 1 MiB: the reset took effect


def run_single(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; returns the JSON record."""
    import contextlib
    import gc
    import resource
    import statistics

    loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    import torch

    from helmlm.models import HELMConfig, HELMForCausalLM
    from helmlm.models.params import count_parameters
    from helmlm.training.allocator import apply_cpu_malloc
    from helmlm.training.optim import adamw, allocate_state

    malloc_set = apply_cpu_malloc(args.cpu_malloc)  # before the model is built, as the trainer does
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path, seq_len, mode = args.config[0], args.seq_len[0], args.mode[0]
    train = mode == "train"

    overrides = {"moe_dispatch": args.moe_dispatch} if args.moe_dispatch else {}
    config = HELMConfig.from_yaml(path, **overrides)
    model = HELMForCausalLM(config)
    params = count_parameters(config)["total"]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.train(train)
    model.loss_chunk_tokens = args.loss_chunk
    model.model.gradient_checkpointing = args.activation_checkpointing
    if args.compile:  # per block, as the trainer does
        model.model.compile_blocks()
    optimizer = adamw(model.parameters(), lr=1e-4) if train else None
    if train:  # as the trainer does on CPU: the moment buffers exist before the first step
        allocate_state(optimizer)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, seq_len), generator=generator)

    def step() -> float | None:
        if train:
            with autocast():
                loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        with torch.inference_mode(), autocast():
            model(input_ids=input_ids).logits.sum().item()  # touch the output
        return None

    gc.collect()
    trimmed = release_free_heap()
    reset = reset_peak_rss()
    baseline = current_rss_mb()
    log(f"  built {model_name(path)} ({params:,} params); baseline RSS {baseline:.0f} MB; "
        f"{args.warmup} warm-up + {args.steps} timed steps")

    loss = None
    for _ in range(args.warmup):
        loss = step()
    # The peak so far (warm-up: with --compile, the compilation too), then the timed steps' own peak.
    warmup_peak = _proc_status_kb("VmHWM") / 1024 if reset else None
    timed_reset = reset and reset_peak_rss()
    times = []
    usage0, cpu0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    cpu_s, usage1 = time.process_time() - cpu0, resource.getrusage(resource.RUSAGE_SELF)
    timed_peak = _proc_status_kb("VmHWM") / 1024 if timed_reset else None

    moe = time_routed_layer(model, config, args, train, autocast)
    step_ms = 1000 * statistics.median(times)
    if moe:
        moe["moe_time_share"] = round(moe["moe_layers"] * moe["moe_layer_ms"] / step_ms, 3)

    peak = _proc_status_kb("VmHWM") / 1024 if reset else ru_maxrss_mb()
    peak = max(peak, baseline, warmup_peak or 0.0)  # ru_maxrss is >= any earlier RSS anyway; never below them
    record = {
        "model": model_name(path),
        "config": path,
        "geometry": config.geometry,
        "ffn": config.ffn,
        "attention": config.attention,
        "params": params,
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "batch": args.batch,
        "seq_len": seq_len,
        "mode": mode,
        "tokens_per_s": round(args.batch * seq_len * args.steps / elapsed, 2),
        "step_ms_median": round(step_ms, 2),
        "elapsed_s": round(elapsed, 3),
        "cpu_s": round(cpu_s, 3),  # process CPU time over the timed steps (all threads)
        "involuntary_ctx_switches": usage1.ru_nivcsw - usage0.ru_nivcsw,  # preemptions: a busy machine
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_rss_mb": round(peak, 1),
        "peak_rss_timed_mb": None if timed_peak is None else round(timed_peak, 1),  # the timed steps only
        "baseline_rss_mb": round(baseline, 1),
        "activation_mb": round(peak - baseline, 1),
        "param_mb": round(param_bytes / 2**20, 1),
        "grad_optimizer_mb": round(3 * param_bytes / 2**20, 1) if train else 0.0,
        "peak_rss_source": "VmHWM (reset after build)" if reset else "ru_maxrss (process lifetime)",
        "malloc_trim": trimmed,
        "cpu_malloc": args.cpu_malloc if malloc_set or args.cpu_malloc == "system" else "system (no glibc)",
        "isolation": args.isolation,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "autocast": "bfloat16" if args.bf16 else None,
        "compile": args.compile,
        "loss_chunk_tokens": args.loss_chunk,
        "activation_checkpointing": args.activation_checkpointing,
        "loss": None if loss is None else round(loss, 4),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "loadavg_1m": None if loadavg is None else round(loadavg, 2),
        **moe,
    }
    return record


def time_routed_layer(model, config, args: argparse.Namespace, train: bool, autocast) -> dict:
    """Median time of one routed layer alone on a ``(batch, seq_len, width)`` input (forward + backward when
    training); empty for models without routed layers."""
    import statistics

    import torch

    from helmlm.geometry import lift
    from helmlm.nn.routing import routed_layers

    layers = routed_layers(model)
    if not layers:
        return {}
    layer = layers[0][1]
    shape = (args.batch, args.seq_len[0], config.hidden_size - (1 if config.is_lorentz else 0))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    x = lift(x, config.curvature) if config.is_lorentz else x
    grad_out = torch.randn(x.shape[:-1] + (config.hidden_size,))

    def run() -> float:
        t0 = time.perf_counter()
        if train:
            with autocast():
                y = layer(x)
            y.backward(grad_out.to(y.dtype))
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast():
                layer(x)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        run()
    times = [run() for _ in range(args.steps)]
    return {"moe_layers": len(layers), "moe_layer_ms": round(1000 * statistics.median(times), 2),
            "moe_dispatch": layer.dispatch}


def child_main(args: argparse.Namespace, out_fd: int | None = None) -> int:
    """Run one measurement and write its JSON line to ``out_fd`` (default: stdout)."""
    # Keep the output channel for the one JSON line: anything else (library prints, C-level writes to fd 1)
    # goes to stderr.
    sys.stdout.flush()
    out = os.fdopen(os.dup(sys.stdout.fileno()) if out_fd is None else out_fd, "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    try:
        record, status = run_single(args), 0
    except Exception as exc:  # reported as a JSON line by the parent
        import traceback

        traceback.print_exc()
        record, status = {"error": f"{type(exc).__name__}: {exc}"}, 1
    out.write(json.dumps(record) + "\n")
    out.close()
    sys.stderr.flush()
    return status


# ------------------------------------------------------------------------------------------------ parent side
def _parse_child_output(text: str, returncode: int) -> dict:
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        record = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        record = {"error": f"no result from the child (exit code {returncode})"}
    if returncode and "error" not in record:
        record["error"] = f"child exited with code {returncode}"
    return record


def preload_for_fork(args: argparse.Namespace) -> None:
    """``--isolation fork``: import the heavy modules once, in this process, before any fork (no torch op runs
    here, so no OpenMP thread pool exists yet for the children to inherit)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch  # noqa: F401

    import helmlm.models  # noqa: F401
    import helmlm.models.params  # noqa: F401


def run_forked(args: argparse.Namespace, config: str, seq_len: int, mode: str) -> dict:
    child_args = argparse.Namespace(**{**vars(args), "config": [config], "seq_len": [seq_len], "mode": [mode],
                                       "single": True})
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, exit without running the parent's clean-up
        status = 1
        try:
            os.close(read_fd)
            status = child_main(child_args, out_fd=write_fd)
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        text = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    return _parse_child_output(text, os.waitstatus_to_exitcode(wait_status))


def run_child(args: argparse.Namespace, config: str, seq_len: int, mode: str) -> dict:
    if args.isolation == "fork":
        return run_forked(args, config, seq_len, mode)
    cmd = [sys.executable, os.path.abspath(__file__), "--single", "--config", config, "--seq-len", str(seq_len),
           "--mode", mode, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += _option_flags(args)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr: passed through
    return _parse_child_output(proc.stdout, proc.returncode)


def best_of(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = dict(max(ok, key=lambda r: r["tokens_per_s"]))
    best["repeat"] = len(runs)
    if len(runs) > 1:
        best["tokens_per_s_runs"] = [r.get("tokens_per_s") for r in runs]
        best["activation_mb_runs"] = [r.get("activation_mb") for r in runs]
    return best


def summarize(args: argparse.Namespace, results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    by_key = {(r["config"], r["seq_len"], r["mode"]): r for r in ok}
    names = {path: model_name(path) for path in args.config}
    summary: dict = {"summary": True, "models": [names[p] for p in args.config]}

    ratios = []
    if len(args.config) >= 2:
        first, second = args.config[0], args.config[1]
        for seq_len in args.seq_len:
            for mode in args.mode:
                a, b = by_key.get((first, seq_len, mode)), by_key.get((second, seq_len, mode))
                if a and b:
                    ratios.append({"seq_len": seq_len, "mode": mode, "numerator": names[first],
                                   "denominator": names[second],
                                   "tokens_per_s_ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 3)})
    summary["tokens_per_s_ratio"] = ratios

    growth = {}
    lo, hi = min(args.seq_len), max(args.seq_len)
    if "eval" in args.mode and hi > lo:
        for path in args.config:
            a, b = by_key.get((path, lo, "eval")), by_key.get((path, hi, "eval"))
            if a and b:
                factor = b["activation_mb"] / a["activation_mb"] if a["activation_mb"] > 0 else None
                growth[names[path]] = {
                    "from_seq_len": lo, "to_seq_len": hi, "seq_len_ratio": round(hi / lo, 3),
                    "activation_mb_from": a["activation_mb"], "activation_mb_to": b["activation_mb"],
                    "growth_factor": None if factor is None else round(factor, 2),
                    "linear_would_be": round(hi / lo, 2), "quadratic_would_be": round((hi / lo) ** 2, 2),
                }
    summary["eval_activation_growth"] = growth

    criteria = {}
    train = [r for r in ratios if r["mode"] == "train"]
    if train:
        routed = any(r.get("ffn") == "moe" for r in ok if r["config"] == args.config[0])
        target = MIN_TRAIN_RATIO["moe" if routed else "dense"]
        criteria["train_tokens_per_s_ratio_min"] = min(r["tokens_per_s_ratio"] for r in train)
        criteria[f"train_ratio_at_least_{target}"] = all(r["tokens_per_s_ratio"] >= target for r in train)
    shares = {f"{names[r['config']]}@{r['seq_len']}/{r['mode']}": r["moe_time_share"] for r in ok
              if "moe_time_share" in r}
    if shares:
        summary["moe_time_share"] = shares
    if growth:
        criteria["eval_memory_roughly_linear"] = {
            name: g["growth_factor"] is not None and g["growth_factor"] <= g["seq_len_ratio"] ** 1.5
            for name, g in growth.items()}
    summary["criteria"] = criteria
    summary["failed_runs"] = len(results) - len(ok)
    summary["command"] = shlex.join([_shell_path(sys.executable), _shell_path(os.path.abspath(__file__))]
                                    + sys.argv[1:])
    return summary


def log_summary(summary: dict) -> None:
    log("\nsummary")
    for r in summary["tokens_per_s_ratio"]:
        log(f"  seq_len {r['seq_len']:>5} {r['mode']:<5}  tokens/s {r['numerator']} / {r['denominator']} = "
            f"{r['tokens_per_s_ratio']:.3f}")
    for name, g in summary["eval_activation_growth"].items():
        log(f"  {name}: eval activation {g['activation_mb_from']:.0f} MB (seq {g['from_seq_len']}) -> "
            f"{g['activation_mb_to']:.0f} MB (seq {g['to_seq_len']}): x{g['growth_factor']} "
            f"(linear x{g['linear_would_be']}, quadratic x{g['quadratic_would_be']})")
    for key, share in summary.get("moe_time_share", {}).items():
        log(f"  {key}: routed layers take {100 * share:.0f}% of a step")
    if summary["criteria"]:
        log(f"  criteria: {json.dumps(summary['criteria'])}")


def parent_main(args: argparse.Namespace) -> int:
    total = len(args.seq_len) * len(args.mode) * args.repeat * len(args.config)
    if args.isolation == "fork":
        preload_for_fork(args)
    results, done = [], 0
    for seq_len in args.seq_len:
        for mode in args.mode:
            runs: dict[str, list[dict]] = {path: [] for path in args.config}
            for _ in range(args.repeat):
                for path in args.config:  # interleaved: the compared models see the same machine load
                    done += 1
                    log(f"[{done}/{total}] {model_name(path)} seq_len={seq_len} mode={mode} batch={args.batch}")
                    record = run_child(args, path, seq_len, mode)
                    if "error" in record:
                        log(f"  FAILED: {record['error']}")
                    else:
                        log(f"  {record['tokens_per_s']:.0f} tokens/s, peak {record['peak_rss_mb']:.0f} MB, "
                            f"activation {record['activation_mb']:.0f} MB")
                    runs[path].append(record)
            for path in args.config:
                record = best_of(runs[path])
                record.setdefault("model", model_name(path))
                record.setdefault("config", path)
                record.setdefault("seq_len", seq_len)
                record.setdefault("mode", mode)
                record["command"] = reproduce_command(args, path, seq_len, mode)
                results.append(record)
                print(json.dumps(record), flush=True)
    summary = summarize(args, results)
    print(json.dumps(summary), flush=True)
    log_summary(summary)
    return 1 if summary["failed_runs"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return child_main(args) if args.single else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
