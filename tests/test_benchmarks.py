"""Smoke test of benchmarks/throughput.py: tiny presets, tiny settings, every stdout line parsed as JSON.

Uses ``--isolation fork`` (torch/helmlm imported once, one forked process per measurement) so that the eight
measurements take seconds; the default ``exec`` isolation shares all other code and costs ~5 s of imports per run.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
CONFIGS = {
    "configs/helm_d_tiny.yaml": ("helm_d_tiny", "lorentz"),
    "configs/llama_tiny.yaml": ("llama_tiny", "euclidean"),
}
SEQ_LENS = (16, 32)
MODES = ("train", "eval")
REQUIRED = {
    "model", "geometry", "params", "batch", "seq_len", "mode", "tokens_per_s", "peak_rss_mb", "baseline_rss_mb",
    "activation_mb", "threads", "dtype", "autocast", "steps", "warmup", "torch", "command",
}


def test_throughput_script_tiny_presets():
    cmd = [sys.executable, str(SCRIPT), "--config", *CONFIGS, "--seq-len", *map(str, SEQ_LENS), "--batch", "2",
           "--steps", "2", "--warmup", "1", "--threads", "1", "--isolation", "fork"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line must be JSON
    runs = [r for r in lines if not r.get("summary")]
    assert [r.get("summary") for r in lines].count(True) == 1 and lines[-1]["summary"] is True

    expected = {(name, n, mode) for name, _ in CONFIGS.values() for n in SEQ_LENS for mode in MODES}
    assert len(runs) == len(expected)
    assert {(r["model"], r["seq_len"], r["mode"]) for r in runs} == expected

    geometry = dict(CONFIGS.values())
    for r in runs:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert "error" not in r
        assert r["geometry"] == geometry[r["model"]]
        assert isinstance(r["params"], int) and r["params"] > 1_000_000
        assert (r["batch"], r["steps"], r["warmup"], r["threads"]) == (2, 2, 1, 1)
        assert r["dtype"] == "float32" and r["autocast"] is None
        assert r["cpu_malloc"] == ("keep" if sys.platform.startswith("linux") else "system (no glibc)")
        assert r["tokens_per_s"] > 0
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert r["activation_mb"] == pytest.approx(r["peak_rss_mb"] - r["baseline_rss_mb"], abs=0.11)
        if r["peak_rss_source"].startswith("VmHWM"):  # the timed steps' own peak, within the whole run's
            assert 0 < r["peak_rss_timed_mb"] <= r["peak_rss_mb"]
        if r["mode"] == "train":
            assert math.isfinite(r["loss"])
        argv = shlex.split(r["command"])
        assert "--single" not in argv
        assert argv[argv.index("--seq-len") + 1] == str(r["seq_len"])
        assert argv[argv.index("--mode") + 1] == r["mode"]
        assert CONFIGS[argv[argv.index("--config") + 1]][0] == r["model"]

    summary = lines[-1]
    assert summary["failed_runs"] == 0
    assert {(x["seq_len"], x["mode"]) for x in summary["tokens_per_s_ratio"]} == {
        (n, mode) for n in SEQ_LENS for mode in MODES}
    assert all(x["tokens_per_s_ratio"] > 0 and x["numerator"] == "helm_d_tiny" for x in summary["tokens_per_s_ratio"])
    assert set(summary["eval_activation_growth"]) == {"helm_d_tiny", "llama_tiny"}


def test_data_throughput_benchmark_prints_json_lines(tmp_path):
    """benchmarks/data_throughput.py on a small local corpus: every stdout line is JSON, with the prepare, loader,
    train and summary records, and the loader/train ratio it reports is consistent with the records."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "some words here and there " * (i % 7 + 1)})
                              + "\n" for i in range(300)))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--source", "local", "--paths",
           str(corpus), "--vocab-size", "300", "--seq-len", "32", "--micro-batch", "4", "--loader-seconds", "0.2",
           "--loader-warmup", "1", "--preset", "helm_d_tiny", "--train-seq-len", "32", "--train-micro-batch", "2",
           "--train-steps", "2", "--train-warmup", "1", "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    kinds = [r.get("measurement", "summary" if r.get("summary") else None) for r in records]
    assert kinds[0] == "prepare" and kinds[-2:] == ["train", "summary"] and set(kinds[1:-2]) == {"loader"}, kinds
    train, summary = records[-2], records[-1]
    loader = next(r for r in records[1:-2] if r["seq_len"] == summary["at"]["seq_len"]
                  and r["micro_batch"] == summary["at"]["micro_batch"])  # the loader at the training step's shape
    assert loader["tokens_per_s"] > 0 and 0 < loader["packing_efficiency"] <= 1
    assert math.isclose(summary["loader_over_train"], loader["tokens_per_s"] / train["tokens_per_s"], rel_tol=1e-3)


def test_decode_benchmark_prints_json_lines_and_cache_bytes_match_the_formula():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--configs", "helm_mice_tiny", "llama_tiny",
           "--contexts", "8", "16", "--decode-steps", "2", "--repeat", "1", "--recompute-at", "16", "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [(r["model"], r["context"]) for r in rows] == [("helm_mice_tiny", 8), ("helm_mice_tiny", 16),
                                                          ("llama_tiny", 8), ("llama_tiny", 16)]
    for r in rows:
        assert r["cache_bytes"] == r["cache_bytes_formula"] > 0 and r["decode_tokens_per_s"] > 0
        assert ("cached_speedup" in r) == (r["context"] == 16)


def test_decode_benchmark_compiled_and_batched():
    """``--compile --batch 1 2``: one line per (batch, context) with the compiled step's speed; cache bytes scale
    with the batch."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--configs", "llama_tiny", "--contexts", "8",
           "--decode-steps", "2", "--repeat", "1", "--recompute-at", "--threads", "1", "--compile", "--batch", "1", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [r["batch"] for r in rows] == [1, 2]
    assert rows[1]["cache_bytes"] == 2 * rows[0]["cache_bytes"] == rows[1]["cache_bytes_formula"]
    assert all(r["compiled_decode_tokens_per_s"] > 0 for r in rows)


def test_gpu_script_cpu_smoke():
    """benchmarks/gpu.py --smoke: every section runs on CPU with tiny presets and prints JSON lines; the grouped
    and dense expert paths agree, and so do the dense document mask and FlexAttention where this torch has it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    sections = [r["section"] for r in rows]
    assert sections.count("train") == 4 and sections.count("train_ratio") == 2 and sections.count("decode") == 4
    assert all(r["tokens_per_s"] > 0 for r in rows if r["section"] == "train")
    experts = next(r for r in rows if r["section"] == "experts")
    assert experts["max_abs_diff_out"] < 1e-4 and experts["max_abs_diff_grad"] < 1e-4
    attention = next(r for r in rows if r["section"] == "document_attention")
    assert "flex_error" in attention or attention["max_abs_diff"] < 1e-4


def test_throughput_warmup_defaults_to_three_steps_when_compiling(monkeypatch):
    """Compiled measurements skip the slow first steps after compiling unless told otherwise; eager keeps one."""
    import importlib.util

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: benchmarks/harness.py importable
    spec = importlib.util.spec_from_file_location("throughput_script", SCRIPT)
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    assert throughput.parse_args([]).warmup == 1
    assert throughput.parse_args(["--compile"]).warmup == 3
    assert throughput.parse_args(["--compile", "--warmup", "0"]).warmup == 0


def test_breakdown_times_every_part_of_both_models_and_their_ops():
    """benchmarks/breakdown.py: a line per part with both models' medians and their ratio (HELM alone for the
    Lorentz residuals, which the Euclidean block adds inline), the step and the optimizer, the ops that differ most,
    a summary; a layer that does not exist is refused with the reason and a non-zero exit."""
    script = ROOT / "benchmarks" / "breakdown.py"
    cmd = [sys.executable, str(script), "--config", "configs/helm_mice_tiny.yaml", "configs/deepseek_tiny.yaml",
           "--batch", "2", "--seq-len", "16", "--repeat", "2", "--warmup", "1", "--threads", "1",
           "--profile-ops", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    parts = {r["part"]: r for r in lines if "part" in r}
    assert list(parts) == ["attn_norm", "attn", "attn_residual", "ffn_norm", "ffn", "ffn_residual", "block", "step",
                           "optimizer"]
    for name, r in parts.items():
        models = ["helm_mice_tiny"] if name.endswith("_residual") else ["helm_mice_tiny", "deepseek_tiny"]
        assert list(r["ms"]) == models and all(len(r["runs"][m]) == 2 for m in models), name
        assert all(r["ms"][m] == pytest.approx(statistics.median(r["runs"][m]), abs=1e-3) for m in models), name
        assert all(r["ms"][m] > 0 for m in models), name
        if len(models) == 2:
            assert r["ratio"] == pytest.approx(r["ms"][models[0]] / r["ms"][models[1]], abs=1e-3)
        else:
            assert "ratio" not in r
    ops = [r for r in lines if "op" in r]
    assert len(ops) == 4 and all(set(r["self_ms"]) == {"helm_mice_tiny", "deepseek_tiny"} for r in ops)
    gaps = [abs(r["self_ms"]["helm_mice_tiny"] - r["self_ms"]["deepseek_tiny"]) for r in ops]
    # the largest differences first, to the printed rounding (which sizes come first varies with timing)
    assert all(a >= b - 2e-3 for a, b in zip(gaps, gaps[1:]))
    assert lines[-1]["summary"] is True and set(lines[-1]["ratios"]) == {p for p in parts if "_residual" not in p}

    bad = subprocess.run([*cmd[:2], "--config", "configs/helm_d_tiny.yaml", "--layer", "7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--layer 7 does not exist" in bad.stderr and not bad.stdout


def test_serve_load_benchmark_prints_json_lines_and_checks_the_outputs(tmp_path):
    """benchmarks/serve_load.py against a tiny model: JSON lines only on stdout (the server's own output goes to
    stderr), a baseline, one line per round, and a summary in which every streamed output equals its run alone."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    pytest.importorskip("psutil")
    import torch

    from helmlm.data.tokenizer import train_bpe
    from helmlm.models import HELMForCausalLM, load_config
    from helmlm.models.hf import save_model_dir

    tokenizer = train_bpe(["The river runs to the sea. Once upon a time she said that the morning was long."] * 50,
                          vocab_size=280)
    torch.manual_seed(0)
    model = HELMForCausalLM(load_config("helm_d_tiny", vocab_size=len(tokenizer), num_hidden_layers=1,
                                        max_position_embeddings=64))
    model_dir = save_model_dir(model, tokenizer, tmp_path / "tiny")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(model_dir), "--clients", "3", "--rounds",
           "2", "--max-tokens", "4", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["what"] for r in lines] == ["alone", "round", "round", "summary"]
    rounds = lines[1:3]
    assert all(r["clients"] == 3 and r["tokens"] <= 12 and r["tokens_per_s"] > 0 and r["rss_mb"] > 0 for r in rounds)
    assert all(r["ttft_median_s"] <= r["latency_median_s"] for r in rounds)
    assert lines[-1]["all_equal_to_alone"] is True
    assert lines[-1]["rss_mb_first_last"] == [rounds[0]["rss_mb"], rounds[1]["rss_mb"]]
