"""HELM-D training speed and memory side by side with the reference implementation, on the same weights.

    python benchmarks/reference.py --reference-dir PATH [--arch L2_W132_A4] [--seq-len 1024] [--threads 1]

``PATH`` is a checkout of the reference code (github.com/Graph-and-Geometric-Learning/helm; measured at 83ac8ff),
the directory that holds its ``helm/`` package. The reference model (``helm.modules.helm_d.LTransformerDecoder``)
is built with its own initialisation and a seed; helmlm's model is loaded from that state dict through
``helmlm.compat.load_reference``, and the script checks that both give the same first loss before timing anything.
Both train on the same random packed batch (documents of random lengths, attention within each document), with
the reference's optimiser split (AdamW, and geoopt's RiemannianAdam for the embedding table) and the reference
training loop's loss (``CrossEntropyLoss`` on the full logits). helmlm runs as its trainer does on CPU (labels into
the model, summed loss, glibc malloc keeping freed memory as ``train.cpu_malloc: keep`` sets it, the optimizer state
created before the first step by ``allocate_state``), with ``--loss-chunk`` for the chunked loss; the reference runs
as its own loop does: the C library's defaults and state created at the first step (``--reference-cpu-malloc keep``
gives it both of helmlm's settings).

Each measurement runs in a forked process of its own; one JSON line per side and a summary line with the ratios.
The reference package imports many libraries its decoder never calls (torch_geometric, torchvision, ...); those
that are not installed are replaced by empty stand-in modules for the import only (the loss check above shows
that the computation did not touch them).
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import log
from throughput import _proc_status_kb, current_rss_mb, release_free_heap, reset_peak_rss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", required=True, type=Path,
                   help="checkout of Graph-and-Geometric-Learning/helm (the directory holding helm/)")
    p.add_argument("--arch", default="L2_W132_A4", help="the reference's arch string (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--documents", type=int, default=4, help="documents packed per row (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="runs per side, interleaved; the best is reported")
    p.add_argument("--loss-chunk", type=int, default=0, help="helmlm: train.loss_chunk_tokens (default: off)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="helmlm: recompute each block in backward (train.activation_checkpointing)")
    p.add_argument("--compile", action="store_true", help="helmlm: torch.compile per block (train.compile)")
    p.add_argument("--cpu-malloc", choices=("keep", "system"), default="keep",
                   help="helmlm: glibc malloc policy, as train.cpu_malloc (default: %(default)s, the trainer's)")
    p.add_argument("--reference-cpu-malloc", choices=("keep", "system"), default="system",
                   help="the reference side's malloc policy; keep also creates its optimizer state before the first "
                        "step, as helmlm's trainer does (default: %(default)s, as its own training loop runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.reference_dir / "helm" / "modules" / "helm_d.py").is_file():
        p.error(f"--reference-dir {args.reference_dir}: no helm/modules/helm_d.py there; pass the root of a checkout "
                "of github.com/Graph-and-Geometric-Learning/helm")
    return args


class _StandIn(types.ModuleType):
    """A module whose every attribute is a do-nothing class: enough for ``from x import Y`` and ``class Z(Y)``."""

    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: None})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: set[str]):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


def import_reference(reference_dir: Path):
    """``(LTransformerDecoder, Lorentz)`` from the checkout, standing in for third-party packages that are missing."""
    import helmlm.models  # noqa: F401  (first: transformers must see the real set of installed packages)

    sys.path.insert(0, str(reference_dir))
    finder = _StandInFinder(set())
    sys.meta_path.append(finder)
    try:
        for _ in range(50):
            try:
                from helm.hypercore.manifolds import Lorentz
                from helm.modules.helm_d import LTransformerDecoder
                return LTransformerDecoder, Lorentz
            except ModuleNotFoundError as err:
                missing = (err.name or "").split(".")[0]
                if not missing or missing in finder.packages or missing == "helm":
                    raise
                finder.packages.add(missing)
                for name in [m for m in sys.modules if m == "helm" or m.startswith("helm.")]:
                    del sys.modules[name]  # re-import the half-imported package with the stand-in in place
        raise RuntimeError("could not import the reference package")
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] in finder.packages]:
            del sys.modules[name]  # the reference keeps what it imported; nothing else should see stand-ins


def packed_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and document ids: each row cut at ``documents - 1`` random points."""
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    cuts = torch.rand(args.batch, args.seq_len, generator=g).argsort(-1)[:, : args.documents - 1]
    starts = torch.zeros(args.batch, args.seq_len, dtype=torch.long).scatter_(1, cuts, 1)
    starts[:, 0] = 0
    return ids, starts.cumsum(-1)


def build_reference(args: argparse.Namespace):
    LTransformerDecoder, Lorentz = import_reference(args.reference_dir)
    torch.manual_seed(args.seed)
    return LTransformerDecoder(Lorentz(1.0), Lorentz(1.0), Lorentz(1.0), args.arch, args.vocab, args.seq_len)


def optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The reference's split: AdamW for Euclidean parameters, RiemannianAdam for manifold ones."""
    import geoopt

    manifold = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    euclidean = [p for p in model.parameters() if not isinstance(p, geoopt.ManifoldParameter)]
    opts = [torch.optim.AdamW(euclidean, lr=1e-4, weight_decay=0.0)]
    if manifold:
        opts.append(geoopt.optim.RiemannianAdam(manifold, lr=1e-4, stabilize=1))
    return opts


def blocked(docs: torch.Tensor) -> torch.Tensor:
    """The reference training loop's block mask ``(B, N, N)``: True where a query may *not* attend a key."""
    return docs.unsqueeze(1) != docs.unsqueeze(2)


def helmlm_copy(reference, args: argparse.Namespace):
    """helmlm's HELM-D with the reference model's weights."""
    from helmlm.compat import load_reference

    return load_reference(reference.state_dict(), model_name="HELM_D", arch=args.arch, vocab_size=args.vocab,
                          max_seq_len=args.seq_len)


def make_step(side: str, args: argparse.Namespace):
    """Build the side's model; return ``(step, model, n_params)``, ``step()`` training once and returning the loss."""
    ids, docs = packed_batch(args)
    labels = ids.clone()
    reference = build_reference(args)
    if side == "reference":
        model = reference
        mask = blocked(docs)
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)

        def forward():
            logits = model(ids, attn_mask=mask)
            return loss_fn(logits.view(-1, logits.size(-1)), labels.view(-1))
    else:
        model = helmlm_copy(reference, args)
        del reference
        model.loss_chunk_tokens = args.loss_chunk
        model.model.gradient_checkpointing = args.activation_checkpointing
        if args.compile:
            model.model.compile_blocks()
        n_targets = labels[:, 1:].numel()

        def forward():  # the trainer's call: summed loss over the shifted targets, divided once
            out = model(input_ids=ids, document_ids=docs, labels=labels, loss_reduction="sum")
            return out.loss / n_targets
    # The reference predicts token i from token i (no shift; its data loader shifts); helmlm shifts inside. Both are
    # timed as they run; the loss check below compares like with like.
    model.train()
    opts = optimizers(model)
    if side == "helmlm" or args.reference_cpu_malloc == "keep":  # the trainer's CPU set-up (see the docstring)
        from helmlm.training.optim import allocate_state

        for opt in opts:
            allocate_state(opt)

    def step() -> float:
        loss = forward()
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model, sum(p.numel() for p in model.parameters())


def first_losses(args: argparse.Namespace) -> dict:
    """Both models' loss on the same targets (next tokens within each document) before any step: the same weights
    give the same value."""
    from helmlm.models.modeling import lm_targets

    ids, docs = packed_batch(args)
    reference = build_reference(args)
    ours = helmlm_copy(reference, args)
    with torch.no_grad():
        logits = reference(ids, attn_mask=blocked(docs))
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lm_targets(ids, docs).flatten(),
                                                ignore_index=-100).item()
        mine = ours(input_ids=ids, document_ids=docs, labels=ids).loss.item()
    return {"reference_loss": round(ref, 6), "helmlm_loss": round(mine, 6)}


def measure(side: str, args: argparse.Namespace) -> dict:
    from helmlm.training.allocator import apply_cpu_malloc

    malloc = args.cpu_malloc if side == "helmlm" else args.reference_cpu_malloc
    if not apply_cpu_malloc(malloc) and malloc == "keep":
        malloc = "system (no glibc)"
    torch.set_num_threads(args.threads)
    step, _, n_params = make_step(side, args)
    gc.collect()
    release_free_heap()
    reset = reset_peak_rss()
    baseline = current_rss_mb()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = max(_proc_status_kb("VmHWM") / 1024 if reset else current_rss_mb(), baseline)
    tokens = args.batch * args.seq_len
    return {"side": side, "arch": args.arch, "params": n_params, "vocab": args.vocab, "batch": args.batch,
            "seq_len": args.seq_len, "threads": torch.get_num_threads(), "tokens_per_s": round(tokens * len(times)
            / sum(times), 1), "step_s": [round(t, 3) for t in times], "peak_rss_mb": round(peak, 1),
            "baseline_rss_mb": round(baseline, 1), "activation_mb": round(peak - baseline, 1), "loss": round(loss, 4),
            "loss_chunk_tokens": args.loss_chunk if side == "helmlm" else None,
            "activation_checkpointing": args.activation_checkpointing if side == "helmlm" else None,
            "compile": args.compile if side == "helmlm" else None, "cpu_malloc": malloc}


def in_fork(fn, *fn_args) -> dict:
    """Run ``fn`` in a forked child and return its JSON-able result (peak RSS is then the child's own)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            result = fn(*fn_args)
        except BaseException as err:  # report, never return into the parent's code
            result, code = {"error": f"{type(err).__name__}: {err}"}, 1
        with os.fdopen(write, "w") as f:
            f.write(json.dumps(result))
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    result = json.loads(text)
    if "error" in result:
        raise SystemExit(f"a measurement failed: {result['error']}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = in_fork(first_losses, args)
    log(f"first loss: reference {check['reference_loss']:.6f}, helmlm {check['helmlm_loss']:.6f}")
    if abs(check["reference_loss"] - check["helmlm_loss"]) > 1e-3 * abs(check["reference_loss"]):
        raise SystemExit("the two models disagree on the same weights; not timing them")
    runs: dict[str, list[dict]] = {"reference": [], "helmlm": []}
    for r in range(args.repeat):
        for side in runs:
            log(f"[{r + 1}/{args.repeat}] {side}")
            runs[side].append(in_fork(measure, side, args))
            log(f"  {runs[side][-1]['tokens_per_s']:.0f} tokens/s, peak {runs[side][-1]['peak_rss_mb']:.0f} MB")
    best = {side: max(rs, key=lambda x: x["tokens_per_s"]) for side, rs in runs.items()}
    for side, record in best.items():
        record["tokens_per_s_runs"] = [x["tokens_per_s"] for x in runs[side]]
        record["peak_rss_mb_runs"] = [x["peak_rss_mb"] for x in runs[side]]
        print(json.dumps(record), flush=True)
    ours, ref = best["helmlm"], best["reference"]
    print(json.dumps({"summary": "helmlm / reference", **check,
                      "tokens_per_s_ratio": round(ours["tokens_per_s"] / ref["tokens_per_s"], 3),
                      "peak_rss_ratio": round(min(ours["peak_rss_mb_runs"]) / min(ref["peak_rss_mb_runs"]), 3),
                      "activation_ratio": round(ours["activation_mb"] / ref["activation_mb"], 3),
                      "command": " ".join([sys.executable, *sys.argv])}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
