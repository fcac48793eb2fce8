"""The Lorentz token table's storage options side by side: speed of one training step of the table and the memory
its parameters and optimizer state hold (issue 32, docs/quality.md "A Lorentz table that survives large steps").

    python benchmarks/table.py --sizes 8192x130 50000x768 128256x390 --threads 2

Options (one JSON line each per size):
- ``manifold-fp32``: Lorentz points in a geoopt ManifoldParameter, Riemannian Adam (the reference's table);
- ``manifold-fp64``: the same, table and state in float64, lookups returned in float32 (``train.table_dtype``);
- ``space-fp32``: the space parts in float32, lifted on lookup (``model.project_emb``), AdamW;
- ``tangent-fp32``: tangent vectors at the origin in float32, mapped by expmap0 on lookup
  (``model.swapped_components=[embedding]``), AdamW.

A step is what training does to the table: look up ``--batch`` x ``--seq-len`` tokens, back-propagate a loss that
reads every coordinate of the looked-up points, and step the table's optimizer (the trainer's split,
:func:`helmlm.training.optim.build_optimizer`). Times are the median of ``--steps`` steps after one warm-up, every
option in turn within one process (``--repeat`` rounds, best median kept). ``state_mb`` counts the bytes of the
table and of its optimizer state exactly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from helmlm.geometry import expmap0
from helmlm.nn import LorentzEmbedding
from helmlm.training.optim import build_optimizer

OPTIONS = ("manifold-fp32", "manifold-fp64", "space-fp32", "tangent-fp32")


class TangentTable(nn.Module):
    """Tangent vectors at the origin, mapped onto the hyperboloid by expmap0 (as a hybrid's Euclidean table)."""

    def __init__(self, vocab: int, space: int):
        super().__init__()
        self.table = nn.Embedding(vocab, space)
        nn.init.normal_(self.table.weight, std=space ** -0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return expmap0(self.table(ids), 1.0)


def build(option: str, vocab: int, width: int) -> nn.Module:
    space = width - 1
    if option == "tangent-fp32":
        return TangentTable(vocab, space)
    table = LorentzEmbedding(vocab, space, manifold_table=option.startswith("manifold"),
                             init_scale=1.0 if option.startswith("manifold") else space ** -0.5)
    if option == "manifold-fp64":
        table.keep_table_in_float64()
    return table


class Probe(nn.Module):
    """The table, and one scalar beside it so that the optimizer split also has an AdamW side, as in a model."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table, self.bias = table, nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids) + self.bias


def state_bytes(table: nn.Module, optimizer) -> int:
    """Bytes of the table's parameters and of their optimizer state."""
    params = {id(p) for p in table.parameters()}
    total = sum(p.numel() * p.element_size() for p in table.parameters())
    for opt in optimizer.optimizers:
        for p, state in opt.state.items():
            if id(p) in params:
                total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def time_option(option: str, vocab: int, width: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    module = Probe(build(option, vocab, width))
    optimizer = build_optimizer(module, lr=1e-3, embedding_lr=0.03)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len))
    probe = torch.randn(args.batch, args.seq_len, width)
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        (module(ids) * probe).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return {"option": option, "vocab": vocab, "width": width, "step_ms": 1e3 * statistics.median(times),
            "state_mb": state_bytes(module.table, optimizer) / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["8192x130", "50000x768"], help="VOCABxWIDTH (ambient width)")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        vocab, width = (int(v) for v in size.split("x"))
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for option in args.options:
                result = time_option(option, vocab, width, args)
                if option not in best or result["step_ms"] < best[option]["step_ms"]:
                    best[option] = result
        reference = best.get("manifold-fp32")
        for option in args.options:
            row = best[option]
            if reference:
                row["step_vs_manifold_fp32"] = row["step_ms"] / reference["step_ms"]
                row["state_vs_manifold_fp32"] = row["state_mb"] / reference["state_mb"]
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
