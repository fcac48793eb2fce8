#!/usr/bin/env python
"""Load on ``helmlm serve``: ``--clients`` concurrent streaming completions, ``--rounds`` times, against the command
started as a separate process on 127.0.0.1, with the official ``openai`` client.

Prints one JSON line for a single request alone (the baseline, after one warm-up request), one per round, and a
summary: wall seconds, generated tokens per second, time to first token and whole-request latency (median and
p95), the server's resident memory after each round, and whether every streamed output equals the same request
sent alone (seeded sampling). Greedy or seeded requests repeat exactly, so the outputs are checked, not just
timed. Example:

    .venv/bin/python benchmarks/serve_load.py runs/models/demo-helm_d_tiny --clients 32 --rounds 3 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time

import openai
import psutil
from harness import emit, loadavg, log

from helmlm.serving import serve_process

PROMPTS = ["The river", "Once upon a time", "The history of the", "In the morning", "She said that"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a model directory (helmlm export / convert output)")
    p.add_argument("--adapter", default=None, help="a LoRA / HypLoRA adapter directory")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming requests per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    return p.parse_args(argv)


def server_args(args: argparse.Namespace) -> list[str]:
    extra = ["--adapter", args.adapter] if args.adapter else []
    return ["--name", "m", "--threads", str(args.threads), "--max-queue", str(max(16, args.clients)), *extra]


async def one(api: openai.AsyncOpenAI, i: int, max_tokens: int) -> dict:
    """One seeded streaming completion: its text, tokens, time to first token and latency."""
    start, first, text, tokens = time.perf_counter(), None, [], 0
    stream = await api.completions.create(model="m", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                          temperature=0.8, seed=i, stream=True)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        text.append(chunk.choices[0].text if chunk.choices else "")
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    return {"text": "".join(text), "tokens": tokens, "ttft_s": first, "latency_s": time.perf_counter() - start}


def run_round(url: str, requests: range | list[int], max_tokens: int) -> tuple[list[dict], float]:
    """Requests ``requests`` (their indices choose prompt and seed) sent at once; their results and the wall time."""
    async def all_at_once() -> list[dict]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600) as api:
            return await asyncio.gather(*(one(api, i, max_tokens) for i in requests))

    start = time.perf_counter()
    results = asyncio.run(all_at_once())
    return results, time.perf_counter() - start


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = {"model_dir": args.model_dir, "adapter": args.adapter, "threads": args.threads,
              "max_tokens": args.max_tokens, "command": shlex.join([sys.executable, *sys.argv])}
    # the server's own output goes to stderr: stdout carries only this script's JSON lines
    with serve_process(args.model_dir, *server_args(args), stdout=sys.stderr,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}) as (proc, url):
        server = psutil.Process(proc.pid)
        run_round(url, [0], args.max_tokens)  # warm-up: the first request pays for lazy initialisation
        alone, wall = run_round(url, [0], args.max_tokens)
        emit({**common, "what": "alone", "tokens_per_s": round(alone[0]["tokens"] / wall, 1),
              "ttft_s": round(alone[0]["ttft_s"], 3), "latency_s": round(wall, 3), "loadavg_1m": loadavg()})
        # request i alone (its prompt, seed i): what each of the concurrent ones must equal
        sequential = [alone[0]["text"]] + [run_round(url, [i], args.max_tokens)[0][0]["text"]
                                           for i in range(1, args.clients)]
        rounds = []
        for r in range(args.rounds):
            results, wall = run_round(url, range(args.clients), args.max_tokens)
            tokens = sum(x["tokens"] for x in results)
            record = {**common, "what": "round", "round": r + 1, "clients": args.clients, "wall_s": round(wall, 2),
                      "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                      "ttft_median_s": round(statistics.median(x["ttft_s"] for x in results), 3),
                      "ttft_p95_s": round(p95([x["ttft_s"] for x in results]), 3),
                      "latency_median_s": round(statistics.median(x["latency_s"] for x in results), 3),
                      "latency_p95_s": round(p95([x["latency_s"] for x in results]), 3),
                      "rss_mb": round(server.memory_info().rss / 2**20, 1),
                      "equal_to_alone": [x["text"] for x in results] == sequential, "loadavg_1m": loadavg()}
            rounds.append(record)
            emit(record)
            log(f"round {r + 1}: {args.clients} streams in {wall:.1f} s, {record['tokens_per_s']} tokens/s, "
                f"RSS {record['rss_mb']} MB, outputs equal to their runs alone: {record['equal_to_alone']}")
        emit({**common, "what": "summary", "clients": args.clients, "rounds": args.rounds,
              "all_equal_to_alone": all(r["equal_to_alone"] for r in rounds),
              "rss_mb_first_last": [rounds[0]["rss_mb"], rounds[-1]["rss_mb"]],
              "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rounds)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
