#!/usr/bin/env python
"""Decoding speed with the KV cache, per model: prefill tokens/s, cached decode tokens/s at several context lengths,
cache bytes (measured and from ``kv_bytes_per_token``), and the speed-up of a cached step over recomputing the
whole context (what decoding without a cache costs per token). With ``--generate-at``, also the end-to-end greedy
decoding speed of both loops at those contexts: ours (``helmlm.generation.generate``) and transformers'
(``model.generate``), prefill included. With ``--compile``, also the compiled step over a static cache
(``helmlm.generation.compiled_step``, what ``generate(compile=True)`` runs), timed after its compilation.

Prints one JSON line per (model, context). Batch ``--batch`` (default 1; tokens/s count every row), fp32, eval mode,
random weights and ids (speed does not depend on them). Example:

    .venv/bin/python benchmarks/decode.py --threads 2
    .venv/bin/python benchmarks/decode.py --configs helm_mice_small deepseek_small --contexts 128 1024
    .venv/bin/python benchmarks/decode.py --configs llama_tiny --contexts 32 --generate-at 32 --repeat 5
    .venv/bin/python benchmarks/decode.py --contexts 512 --compile --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from helmlm.generation import SamplingSettings, compiled_step, generate, static_capacity
from helmlm.models import HELMForCausalLM, load_config, output_cache
from helmlm.nn.cache import StaticModelCache


def timed(fn, repeat: int) -> float:
    """Best-of-``repeat`` seconds of ``fn()``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def generate_speeds(model: HELMForCausalLM, prompt: torch.Tensor, new_tokens: int, repeat: int) -> dict:
    """Greedy tokens/s, prefill included, of our loop and of transformers' ``model.generate`` (no EOS), alternated."""
    def ours():
        return generate(model, [prompt.tolist()], SamplingSettings(max_new_tokens=new_tokens, temperature=0))

    def theirs():
        return model.generate(prompt.unsqueeze(0), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)

    best = {"generate_tokens_per_s": float("inf"), "hf_generate_tokens_per_s": float("inf")}
    for _ in range(repeat):
        for key, fn in (("generate_tokens_per_s", ours), ("hf_generate_tokens_per_s", theirs)):
            best[key] = min(best[key], timed(fn, 1))
    return {key: new_tokens / seconds for key, seconds in best.items()}


@torch.no_grad()
def compiled_decode_seconds(model: HELMForCausalLM, ids: torch.Tensor, context: int, decode_steps: int,
                            repeat: int) -> float:
    """Best-of-``repeat`` seconds of ``decode_steps`` compiled steps after a prefill of ``context`` tokens (one
    untimed run first: it compiles)."""
    step = compiled_step(model)
    capacity = static_capacity(context + decode_steps, model.config.max_position_embeddings)

    def run() -> float:
        cache = StaticModelCache.from_cache(output_cache(model(ids[:, :context], use_cache=True)), capacity)
        start = time.perf_counter()
        for t in range(context, context + decode_steps):
            step(ids[:, t : t + 1], torch.full((ids.shape[0], 1), t), cache)
            cache.advance(1)
        return time.perf_counter() - start

    run()
    return min(run() for _ in range(repeat))


@torch.no_grad()
def measure(model: HELMForCausalLM, context: int, decode_steps: int, repeat: int, recompute: bool,
            end_to_end: bool = False, compile: bool = False, batch: int = 1) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context + decode_steps))
    prefill_s = timed(lambda: model(ids[:, :context], use_cache=True), repeat)

    def decode() -> None:
        cache = output_cache(model(ids[:, :context], use_cache=True))
        start = time.perf_counter()
        for t in range(context, context + decode_steps):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        decode.seconds = time.perf_counter() - start
        decode.cache = cache

    best = float("inf")
    for _ in range(repeat):
        decode()
        best = min(best, decode.seconds)
    step_s = best / decode_steps
    row = {"context": context, "prefill_tokens_per_s": batch * context / prefill_s,
           "decode_tokens_per_s": batch / step_s, "decode_ms_per_step": 1e3 * step_s,
           "cache_bytes": decode.cache.nbytes(),
           "cache_bytes_formula": batch * (context + decode_steps) * model.kv_bytes_per_token(),
           "kv_bytes_per_token": model.kv_bytes_per_token()}
    if compile:
        compiled_s = compiled_decode_seconds(model, ids, context, decode_steps, repeat) / decode_steps
        row.update(compiled_decode_tokens_per_s=batch / compiled_s, compiled_decode_ms_per_step=1e3 * compiled_s)
    if recompute:  # one uncached step = a full forward over the context
        full_s = timed(lambda: model(ids[:, : context + 1]), repeat)
        row.update(recompute_ms_per_token=1e3 * full_s, cached_speedup=full_s / step_s)
    if end_to_end and batch == 1:
        generate_speeds(model, ids[0, :context], decode_steps, 1)  # warm-up
        row.update(generate_speeds(model, ids[0, :context], decode_steps, repeat))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+",
                        default=["helm_d_small", "llama_small", "helm_mice_small", "deepseek_small"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 1024, 2048])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument("--recompute-at", nargs="*", type=int, default=[1024],
                        help="contexts at which to also time recomputation (slow at long contexts)")
    parser.add_argument("--generate-at", nargs="*", type=int, default=[],
                        help="contexts at which to also time greedy decoding end to end, ours and model.generate")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled step over a static cache (compiles once per model and shape)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (rows decoded at once)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.configs:
        torch._dynamo.reset()  # each model compiles afresh: dynamo's recompile limit is shared by all of them
        torch.manual_seed(0)
        config = load_config(name, max_position_embeddings=max(args.contexts) + args.decode_steps + 1)
        model = HELMForCausalLM(config).eval()
        for batch in args.batch:
            for context in args.contexts:
                print(f"{name}: batch {batch}, context {context}", file=sys.stderr, flush=True)
                row = measure(model, context, args.decode_steps, args.repeat, context in args.recompute_at,
                              context in args.generate_at, args.compile, batch)
                print(json.dumps({"model": name, "geometry": config.geometry, "attention": config.attention,
                                  "threads": args.threads, "batch": batch, "dtype": "float32", **row,
                                  "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
