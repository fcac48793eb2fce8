"""Minimal training-step timer, one JSON line per preset: the quick check used while optimising (docs/LOG.md).

    python benchmarks/step_time.py helm_d_small llama_small --threads 2 --batch 8 --seq-len 1024

Builds each preset, runs one warm-up step, then ``--steps`` timed steps of forward + loss + backward + AdamW on
random tokens, and reports the fastest (the least disturbed by other processes). ``benchmarks/throughput.py`` is
the full benchmark (memory, eval mode, isolation, repeats).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from helmlm.models import HELMForCausalLM, load_config
from helmlm.training.optim import adamw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.configs:
        torch.manual_seed(0)
        config = load_config(name, max_position_embeddings=args.seq_len)
        model = HELMForCausalLM(config)
        optimizer = adamw(model.parameters(), lr=1e-4)  # fused where the trainer's is
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
        times = []
        for i in range(args.steps + 1):
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - start)
        best = min(times)
        print(json.dumps({"model": name, "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads,
                          "best_step_s": round(best, 3), "tokens_per_s": round(args.batch * args.seq_len / best, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
