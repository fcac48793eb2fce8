#!/usr/bin/env python
"""Decoding speed with the KV cache, per model: prefill tokens/s, cached decode tokens/s at several context lengths,
cache bytes (measured and from ``kv_bytes_per_token``), and the speed-up of a cached step over recomputing the
whole context (what decoding without a cache costs per token). With ``--generate-at``, also the end-to-end greedy
decoding speed of both loops at those contexts: ours (``helmlm.generation.generate``) and transformers'
(``model.generate``), prefill included.

Prints one JSON line per (model, context). Batch 1, fp32, eval mode, random weights and ids (speed does not depend
on them). Example:

    .venv/bin/python benchmarks/decode.py --threads 2
    .venv/bin/python benchmarks/decode.py --configs helm_mice_small deepseek_small --contexts 128 1024
    .venv/bin/python benchmarks/decode.py --configs llama_tiny --contexts 32 --generate-at 32 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from helmlm.generation import SamplingSettings, generate
from helmlm.models import HELMForCausalLM, load_config, output_cache


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
def measure(model: HELMForCausalLM, context: int, decode_steps: int, repeat: int, recompute: bool,
            end_to_end: bool = False) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context + decode_steps))
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
    row = {"context": context, "prefill_tokens_per_s": context / prefill_s, "decode_tokens_per_s": 1 / step_s,
           "decode_ms_per_token": 1e3 * step_s, "cache_bytes": decode.cache.nbytes(),
           "cache_bytes_formula": (context + decode_steps) * model.kv_bytes_per_token(),
           "kv_bytes_per_token": model.kv_bytes_per_token()}
    if recompute:  # one uncached step = a full forward over the context
        full_s = timed(lambda: model(ids[:, : context + 1]), repeat)
        row.update(recompute_ms_per_token=1e3 * full_s, cached_speedup=full_s / step_s)
    if end_to_end:
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
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.configs:
        torch.manual_seed(0)
        config = load_config(name, max_position_embeddings=max(args.contexts) + args.decode_steps + 1)
        model = HELMForCausalLM(config).eval()
        for context in args.contexts:
            print(f"{name}: context {context}", file=sys.stderr, flush=True)
            row = measure(model, context, args.decode_steps, args.repeat, context in args.recompute_at,
                          context in args.generate_at)
            print(json.dumps({"model": name, "geometry": config.geometry, "attention": config.attention,
                              "threads": args.threads, "batch": 1, "dtype": "float32", **row,
                              "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
