"""Where a model's training step goes against another's: one JSON line per part, both models timed in one process.

    python benchmarks/breakdown.py --config configs/helm_d_small.yaml configs/llama_small.yaml \
        --batch 8 --seq-len 256 --threads 2 --repeat 15 [--layer 1] [--compile] [--profile-ops 25]

Parts (forward + backward, on the inputs that layer ``--layer`` received in one forward pass of random tokens):
each sub-module of the layer that ran (``attn_norm``, ``attn``, ``attn_residual``, ``ffn_norm``, ``ffn``,
``ffn_residual``; the Euclidean blocks add their residuals inline, so those parts exist for HELM only) and the
whole layer (``block``); then the whole training step (``step``: forward + loss + backward + AdamW, fused where the
trainer's is) and the optimizer step alone (``optimizer``), with the trainer's malloc policy
(``train.cpu_malloc=keep``). The models take turns within every repeat (the order flipping each time), so that load
from other processes affects them alike; each line gives the median milliseconds per model after ``--warmup``
untimed repeats, every timed run, and ``ratio``: first model's time over the second's (above 1: the first is
slower). ``--compile`` compiles each part (``torch.compile`` of the module; the step then runs with compiled
blocks, as ``train.compile`` does).

Parts are timed alone, on fresh copies of their inputs: a part's time includes bringing its data into cache,
which inside the step its neighbours have often done, so the parts of the elementwise kind read higher than
their share of the step (the scaled residual: ~1.7 ms alone, ~0.9 ms of the step; docs/LOG.md).

``--profile-ops N`` adds, per model, one profiled training step (``torch.profiler``, CPU) and prints the N
operations (ATen operations and autograd nodes) whose self time differs most between the first two models
(``self_ms`` and ``calls`` per model). The profiler inflates short operations: compare, do not add up. The last
line is a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from helmlm.models import HELMConfig, HELMForCausalLM
from helmlm.training.allocator import apply_cpu_malloc
from helmlm.training.optim import adamw, allocate_state

PARTS = ("attn_norm", "attn", "attn_residual", "ffn_norm", "ffn", "ffn_residual")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", required=True, help="model configs (YAML); ratios are first / second")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layer", type=int, default=1, help="the layer whose parts are timed (default 1: the first "
                   "routed layer of the MoE presets)")
    p.add_argument("--repeat", type=int, default=15, help="timed repeats per part and model")
    p.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    p.add_argument("--compile", action="store_true", help="torch.compile each part (and the step's blocks)")
    p.add_argument("--profile-ops", type=int, default=0, metavar="N", help="also print the N operations whose "
                   "self time differs most between the first two models (one profiled step each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch", "seq_len", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.profile_ops < 0 or args.layer < 0:
        p.error("--warmup, --profile-ops and --layer must not be negative")
    return args


class Subject:
    """One model: its training-step pieces and the captured inputs of the timed layer's parts."""

    def __init__(self, path: str, args: argparse.Namespace):
        config = HELMConfig.from_yaml(path)
        if args.layer >= config.num_hidden_layers:
            raise SystemExit(f"breakdown.py: --layer {args.layer} does not exist in {path} "
                             f"({config.num_hidden_layers} layers, numbered from 0)")
        if args.seq_len > config.max_position_embeddings:
            raise SystemExit(f"breakdown.py: --seq-len {args.seq_len} exceeds {path}'s max_position_embeddings "
                             f"({config.max_position_embeddings})")
        torch.manual_seed(args.seed)
        self.name = Path(path).stem
        self.model = HELMForCausalLM(config).train()
        self.optimizer = adamw(self.model.parameters(), lr=1e-4)
        allocate_state(self.optimizer)
        generator = torch.Generator().manual_seed(args.seed)
        self.ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator)
        self.parts = self._capture(self.model.model.layers[args.layer])
        if args.compile:  # the blocks in place, as train.compile does (the block part is one of them)
            self.model.model.compile_blocks()
            self.parts = {name: (module if name == "block" else torch.compile(module), *rest)
                          for name, (module, *rest) in self.parts.items()}

    def _capture(self, layer: torch.nn.Module) -> dict[str, tuple]:
        """``{part: (module, args, kwargs, output shape)}`` from one forward pass (inputs detached)."""
        found, hooks = {}, []

        def keep(name):
            def hook(module, args, kwargs, output):
                found[name] = (module, tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                               {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output.shape)
            return hook

        for name in PARTS:
            if isinstance(getattr(layer, name, None), torch.nn.Module):
                hooks.append(getattr(layer, name).register_forward_hook(keep(name), with_kwargs=True))
        hooks.append(layer.register_forward_hook(keep("block"), with_kwargs=True))
        with torch.no_grad():
            self.model(self.ids)
        for hook in hooks:
            hook.remove()
        return found

    def time_part(self, name: str) -> float:
        """Milliseconds of one forward + backward of ``name`` (its floating-point activations need gradients)."""
        module, args, kwargs, shape = self.parts[name]
        args = tuple(a.clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() and a.dim() >= 3
                     else a for a in args)
        grad = torch.randn(shape)
        start = time.perf_counter()
        module(*args, **kwargs).backward(grad)
        elapsed = time.perf_counter() - start
        self.model.zero_grad(set_to_none=True)
        return elapsed * 1e3

    def time_step(self) -> float:
        start = time.perf_counter()
        self.model(self.ids, labels=self.ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) * 1e3

    def time_optimizer(self) -> float:
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        start = time.perf_counter()
        self.optimizer.step()
        elapsed = time.perf_counter() - start
        self.optimizer.zero_grad(set_to_none=True)
        return elapsed * 1e3

    def op_times(self) -> tuple[Counter, Counter]:
        """Self CPU milliseconds and calls per operation (ATen operations, autograd nodes) over one training step."""
        from torch.profiler import ProfilerActivity, profile

        self.time_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.time_step()
        self_ms, calls = Counter(), Counter()
        for event in prof.key_averages():
            self_ms[event.key] += event.self_cpu_time_total / 1e3
            calls[event.key] += event.count
        return self_ms, calls


def measure(subjects: list[Subject], timer, args: argparse.Namespace) -> dict[str, list[float]]:
    runs = {s.name: [] for s in subjects}
    for r in range(args.warmup + args.repeat):
        for s in subjects if r % 2 == 0 else subjects[::-1]:
            ms = timer(s)
            if r >= args.warmup:
                runs[s.name].append(round(ms, 3))
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_cpu_malloc("keep")  # the trainer's default: glibc keeps freed memory (docs/benchmarks.md)
    torch.set_num_threads(args.threads)
    subjects = [Subject(path, args) for path in args.config]
    names = [s.name for s in subjects]
    if len(set(names)) < len(names):
        raise SystemExit(f"breakdown.py: two configs share a file name ({', '.join(names)}); rename one")
    common = {"batch": args.batch, "seq_len": args.seq_len, "threads": args.threads, "layer": args.layer,
              "compile": args.compile, "torch": torch.__version__}
    parts = [p for p in (*PARTS, "block") if any(p in s.parts for s in subjects)]
    timers = [(part, [s for s in subjects if part in s.parts], lambda s, part=part: s.time_part(part))
              for part in parts]
    timers += [("step", subjects, Subject.time_step), ("optimizer", subjects, Subject.time_optimizer)]
    ratios = {}
    for part, who, timer in timers:
        runs = measure(who, timer, args)
        ms = {name: round(statistics.median(values), 3) for name, values in runs.items()}
        line = {"part": part, "ms": ms, "runs": runs, **common}
        if len(who) >= 2:
            line["ratio"] = ratios[part] = round(ms[who[0].name] / ms[who[1].name], 3)
        print(json.dumps(line), flush=True)
        print(f"{part:>14s}  " + "  ".join(f"{n} {v:8.2f} ms" for n, v in ms.items())
              + (f"  ratio {line['ratio']:.3f}" if "ratio" in line else ""), file=sys.stderr, flush=True)
    if args.profile_ops and len(subjects) >= 2:
        (a_ms, a_calls), (b_ms, b_calls) = subjects[0].op_times(), subjects[1].op_times()
        ops = sorted(set(a_ms) | set(b_ms), key=lambda k: -abs(a_ms[k] - b_ms[k]))[: args.profile_ops]
        for op in ops:
            print(json.dumps({"op": op, "self_ms": {names[0]: round(a_ms[op], 3), names[1]: round(b_ms[op], 3)},
                              "calls": {names[0]: a_calls[op], names[1]: b_calls[op]}, **common}), flush=True)
    print(json.dumps({"summary": True, "models": names, "ratios": ratios, **common,
                      "command": " ".join([Path(sys.executable).name, *sys.argv])}), flush=True)


if __name__ == "__main__":
    main()
