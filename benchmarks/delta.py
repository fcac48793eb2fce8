"""Time of delta_hyperbolicity (helmlm.analysis): exact on n points, and sampled (k base points) on larger sets.
Prints one JSON line per case. Usage: python benchmarks/delta.py [--threads 2] [--exact 100 200 400]
[--sampled 2000] [--base-points 4]"""

import argparse
import json
import time

import torch

from helmlm.analysis import delta_hyperbolicity, pairwise_distances


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--exact", type=int, nargs="*", default=[100, 200, 400])
    p.add_argument("--sampled", type=int, nargs="*", default=[2000])
    p.add_argument("--base-points", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(n, True) for n in args.exact] + [(n, False) for n in args.sampled]
    for n, exact in cases:
        dist = pairwise_distances(torch.randn(n, args.dim, generator=torch.Generator().manual_seed(0)))
        start = time.perf_counter()
        result = delta_hyperbolicity(dist, exact=exact, base_points=args.base_points)
        seconds = time.perf_counter() - start
        print(json.dumps({"points": n, "exact": exact, "base_points": result.base_points, "seconds": round(seconds, 2),
                          "seconds_per_base_point": round(seconds / result.base_points, 4),
                          "relative_delta": round(result.relative_delta, 5), "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
