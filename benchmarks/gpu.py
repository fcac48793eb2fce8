#!/usr/bin/env python
"""The GPU checks of docs/benchmarks.md, one JSON line per measurement: training speed, MFU and peak memory of each
HELM model beside its Euclidean twin (bf16 autocast), HELM-MiCE's grouped experts against the dense path
(agreement and speed), document-masked attention (the dense mask the models use today against FlexAttention with a
document mask, where this torch has it), and cached decoding at batch 1.

    .venv/bin/python benchmarks/gpu.py                      # CUDA, the paper-scale presets
    .venv/bin/python benchmarks/gpu.py --smoke              # CPU, tiny presets, one step each (tests run this)

MFU counts ``6 x active parameters`` FLOPs per trained token (attention's ``N^2`` term left out, so it is a lower
bound) against ``--peak-tflops`` (default: the bf16 dense peak of the GPU's name when known: H100/H200 989, A100
312). Memory: ``torch.cuda.max_memory_allocated`` after a reset (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from helmlm.models import HELMForCausalLM, load_config, output_cache
from helmlm.models.params import count_parameters
from helmlm.nn.attention import document_causal_mask
from helmlm.nn.routing import routed_layers

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
PAIRS = {"paper": [("helm_d_paper", "llama_paper"), ("helm_mice_120m", "deepseek_120m")],
         "smoke": [("helm_d_tiny", "llama_tiny"), ("helm_mice_tiny", "deepseek_tiny")]}


def emit(**row) -> None:
    print(json.dumps({**row, "torch": torch.__version__}), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn`` (mean over ``steps`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def train_speed(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    config = load_config(name, max_position_embeddings=max(args.seq_len, 2))
    model = HELMForCausalLM(config).to(device).train()
    model.loss_chunk_tokens = args.loss_chunk
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    docs = (torch.arange(args.seq_len, device=device) // max(1, args.seq_len // 4)).expand(args.batch, -1)

    def step() -> None:
        with autocast(device, args.bf16):
            loss = model(ids, labels=ids, document_ids=docs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_memory(device)
    seconds = timed(step, device, args.steps, args.warmup)
    tokens_per_s = args.batch * args.seq_len / seconds
    active = count_parameters(config)["active"]
    peak = peak_tflops(device, args.peak_tflops)
    return {"section": "train", "model": name, "geometry": config.geometry, "attention": config.attention,
            "ffn": config.ffn, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_s": round(tokens_per_s, 1),
            "active_parameters": active, "mfu": None if peak is None else round(
                6 * active * tokens_per_s / (peak * 1e12), 4), "peak_memory_mb": peak_memory_mb(device),
            "bf16": args.bf16, "loss_chunk_tokens": args.loss_chunk, "documents_per_row": 4}


def expert_paths(name: str, args, device: torch.device) -> dict | None:
    """One routed layer of ``name``: grouped against dense, outputs and input gradients, forward + backward time."""
    torch.manual_seed(0)
    config = load_config(name)
    model = HELMForCausalLM(config).to(device)
    layers = routed_layers(model)
    if not layers:
        return None
    _, layer = layers[0]
    width = config.hidden_size
    x = torch.randn(args.batch * args.seq_len, width, device=device) * 0.5
    if config.is_lorentz:
        from helmlm.geometry import lift

        x = lift(x[:, 1:], config.curvature)
    results = {}
    for dispatch in ("grouped", "dense"):
        layer.dispatch = dispatch
        xi = x.clone().requires_grad_(True)

        def run(xi=xi):
            with autocast(device, args.bf16):
                out = layer(xi.unsqueeze(0))
            out.float().square().mean().backward()
            return out

        try:
            out = run()
        except RuntimeError as err:  # no grouped kernel for this device / dtype
            results[dispatch] = {"error": str(err).splitlines()[0]}
            continue
        results[dispatch] = {"out": out.detach().float(), "grad": xi.grad.detach().float(),
                             "seconds": timed(run, device, args.steps, args.warmup)}
    row = {"section": "experts", "model": name, "tokens": x.shape[0], "bf16": args.bf16}
    for dispatch, r in results.items():
        row[f"{dispatch}_ms"] = None if "error" in r else round(1e3 * r["seconds"], 3)
        if "error" in r:
            row[f"{dispatch}_error"] = r["error"]
    if all("error" not in r for r in results.values()):
        row["max_abs_diff_out"] = float((results["grouped"]["out"] - results["dense"]["out"]).abs().max())
        row["max_abs_diff_grad"] = float((results["grouped"]["grad"] - results["dense"]["grad"]).abs().max())
        row["grouped_speedup"] = round(results["dense"]["seconds"] / results["grouped"]["seconds"], 3)
    return row


def document_attention(args, device: torch.device) -> dict:
    """Causal attention within 4 packed documents per row: SDPA with the dense (B, 1, N, N) mask the models build
    today, against FlexAttention with a document mask (no N x N tensor), where available."""
    heads, dim, n = 8, 64, args.seq_len
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    q, k, v = (torch.randn(args.batch, heads, n, dim, device=device, dtype=dtype) for _ in range(3))
    docs = (torch.arange(n, device=device) // max(1, n // 4)).expand(args.batch, -1)
    mask = document_causal_mask(docs)
    reset_memory(device)
    dense_s = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device, args.steps, args.warmup)
    row = {"section": "document_attention", "batch": args.batch, "heads": heads, "head_dim": dim, "seq_len": n,
           "dtype": str(dtype).removeprefix("torch."), "dense_mask_ms": round(1e3 * dense_s, 3),
           "dense_mask_mb": round(mask.numel() * mask.element_size() / 2**20, 2),
           "dense_peak_memory_mb": peak_memory_mb(device)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document_causal(b, h, qi, ki):
            return (docs[b, qi] == docs[b, ki]) & (ki <= qi)

        block = create_block_mask(document_causal, args.batch, None, n, n, device=device.type)
        if device.type == "cuda":
            flex = torch.compile(flex_attention)
        else:  # the smoke run: eager FlexAttention (it warns that it is unfused; here only agreement matters)
            import warnings

            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex = flex_attention
        out_flex = flex(q, k, v, block_mask=block)
        out_dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        reset_memory(device)
        flex_s = timed(lambda: flex(q, k, v, block_mask=block), device, args.steps, args.warmup)
        row.update(flex_ms=round(1e3 * flex_s, 3), flex_peak_memory_mb=peak_memory_mb(device),
                   flex_speedup=round(dense_s / flex_s, 3),
                   max_abs_diff=float((out_flex.float() - out_dense.float()).abs().max()))
    except Exception as err:  # noqa: BLE001  (older torch, no compiler, unsupported device: reported, not fatal)
        row["flex_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return row


@torch.no_grad()
def decode_speed(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    config = load_config(name, max_position_embeddings=args.context + args.decode_steps + 1)
    model = HELMForCausalLM(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.context + args.decode_steps), device=device)

    def decode() -> None:
        with autocast(device, args.bf16):
            cache = output_cache(model(ids[:, :args.context], use_cache=True))
            for t in range(args.context, args.context + args.decode_steps):
                model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)

    with autocast(device, args.bf16):
        prefill_s = timed(lambda: model(ids[:, :args.context], use_cache=True), device, args.steps, args.warmup)
    total_s = timed(decode, device, 1, 1)
    step_s = max(total_s - prefill_s, 1e-9) / args.decode_steps
    return {"section": "decode", "model": name, "context": args.context, "decode_steps": args.decode_steps,
            "prefill_tokens_per_s": round(args.context / prefill_s, 1), "decode_tokens_per_s": round(1 / step_s, 1),
            "bf16": args.bf16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny presets, tiny sizes, one step each")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8; smoke 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; smoke 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--context", type=int, default=None, help="decoding: prompt tokens (default 512; smoke 16)")
    parser.add_argument("--decode-steps", type=int, default=None, help="decoding: new tokens (default 64; smoke 4)")
    parser.add_argument("--loss-chunk", type=int, default=0, help="train.loss_chunk_tokens for the training runs")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak, for MFU")
    parser.add_argument("--sections", nargs="+", default=["train", "experts", "document_attention", "decode"],
                        choices=["train", "experts", "document_attention", "decode"])
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {"batch": (8, 2), "seq_len": (2048, 64), "steps": (10, 1), "warmup": (3, 1), "context": (512, 16),
                "decode_steps": (64, 4)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --smoke for the CPU check, or --device cpu")
    args.bf16 = device.type == "cuda"  # CPU bf16 matmuls are slower than fp32 (docs/benchmarks.md)
    pairs = PAIRS["smoke" if smoke else "paper"]
    emit(section="device", device=str(device), name=torch.cuda.get_device_name(device) if device.type == "cuda"
         else "cpu", bf16=args.bf16, smoke=smoke)
    for hyperbolic, twin in pairs:
        if "train" in args.sections:
            rows = [train_speed(name, args, device) for name in (hyperbolic, twin)]
            for row in rows:
                emit(**row)
            emit(section="train_ratio", models=[hyperbolic, twin],
                 tokens_per_s_ratio=round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 3),
                 peak_memory_ratio=None if rows[0]["peak_memory_mb"] is None else round(
                     rows[0]["peak_memory_mb"] / rows[1]["peak_memory_mb"], 3))
        if "experts" in args.sections:
            row = expert_paths(hyperbolic, args, device)
            if row is not None:
                emit(**row)
        if "decode" in args.sections:
            for name in (hyperbolic, twin):
                emit(**decode_speed(name, args, device))
    if "document_attention" in args.sections:
        emit(**document_attention(args, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
