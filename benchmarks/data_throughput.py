#!/usr/bin/env python
"""Data pipeline throughput on CPU: corpus preparation (text -> tokenized shards), the packed-row loader, and, for
comparison, the tokens/s a training step of a small model consumes.

Prints one JSON line per measurement on stdout (progress goes to stderr) and a final line with ``"summary": true``.

What is measured
    1. ``prepare`` (skipped with ``--data-dir``): the corpus (``--source builtin``: the built-in offline corpus,
       built or verified *before* any timing; ``--source local --paths ...``: any files) is prepared twice into a
       fresh temporary directory with :func:`helmlm.data.shards.prepare_data`:

       a. with the default byte-level BPE (``--vocab-size``, 8192): ``total_s`` is the wall time of the whole call;
          ``tokenize_write_s`` is the manifest's ``seconds`` (read documents + tokenize + write shards);
          ``tokenizer_train_s = total_s - tokenize_write_s`` (BPE training, plus saving/hashing the tokenizer);
       b. again into a second directory with ``tokenizer=<dir a>/tokenizer`` (no training): the tokenize + write
          phase alone, its wall time including loading the tokenizer.

       ``MB/s`` is UTF-8 megabytes (1e6 bytes, the manifest's ``bytes_read``) per second. ``read_s`` times reading
       and decoding the documents alone (no tokenization), so the tokenizer's share can be told apart. The Rust
       tokenizer's thread pool is limited to ``--threads`` (``RAYON_NUM_THREADS``, unless already set).
    2. ``loader``: for every ``--seq-len``: the construction of ``PackedRows(dir, "train", seq_len)`` (memory-maps
       the shards and computes the best-fit-decreasing packing plan), then for every ``--micro-batch``: batches of
       ``micro_batch`` rows drawn exactly as the trainer draws them (``RowStream.global_batch(micro_batch, 1, 1, 0)``
       then ``PackedRows.batch``) for ``--loader-seconds`` after ``--loader-warmup`` untimed batches.
       ``tokens_per_s`` counts real tokens (``attention_mask.sum()``), ``slots_per_s`` all ``B x seq_len`` slots;
       ``packing_efficiency`` is the split's real tokens / slots (``PackedRows.stats``); ``index_share`` is the
       share of the loop spent in ``RowStream.global_batch``.
    3. ``train``: ``--train-mode trainer`` (default) builds a :class:`helmlm.training.trainer.Trainer` (``--preset``,
       helm_d_tiny, its vocab at least the tokenizer's; fp32 on CPU) on the prepared data and times
       ``--train-steps`` calls of ``Trainer.train_step()`` after ``--train-warmup`` untimed ones (a step includes
       drawing its batch from the loader, the loss, backward, clipping and both optimizers); tokens/s counts real
       tokens like the loader. ``--train-mode random`` times a plain forward + loss + backward + AdamW step on
       random ids (``micro_batch x seq_len`` slots, all real) instead.

The summary divides the loader's real tokens/s at the training shape (``--train-seq-len`` x
``--train-micro-batch``; measured even if not in the lists) by the training step's real tokens/s:
``loader_over_train``, which should be >= 20 on CPU (``criteria``; checked also against the fastest training step,
``loader_over_train_best_step``, the conservative value on a machine shared with other processes). Every record
carries ``loadavg_1m``: with a load above ``--threads`` the timings are provisional.

Usage (from the repository root)::

    .venv/bin/python benchmarks/data_throughput.py                       # builtin corpus, ~2 min on 2 cores
    .venv/bin/python benchmarks/data_throughput.py --max-documents 200  # quicker
    .venv/bin/python benchmarks/data_throughput.py --source local --paths 'corpus/*.jsonl' --text-field text
    .venv/bin/python benchmarks/data_throughput.py --data-dir runs/data/builtin   # loader + train only
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import emit, loadavg, log

MIN_LOADER_OVER_TRAIN = 20.0
MIN_LOADER_TOKENS_PER_S = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Preparation MB/s, loader tokens/s and training tokens/s; one JSON line per measurement.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--source", choices=("builtin", "local"), default="builtin")
    data.add_argument("--paths", nargs="+", default=[], metavar="PATH",
                      help="files, directories or globs for --source local")
    data.add_argument("--text-field", default="text", help="JSONL / parquet field with the text (--source local)")
    data.add_argument("--max-documents", type=int, default=None, help="prepare at most this many documents")
    data.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    data.add_argument("--data-dir", default=None,
                      help="an already prepared data directory: skip the preparation measurement and use it")
    data.add_argument("--keep", action="store_true", help="keep the temporary data directory (path on stderr)")
    loader = parser.add_argument_group("loader")
    loader.add_argument("--seq-len", nargs="+", type=int, default=[256, 1024], metavar="INT")
    loader.add_argument("--micro-batch", nargs="+", type=int, default=[8, 32], metavar="INT")
    loader.add_argument("--loader-seconds", type=float, default=2.0, help="timed seconds per loader measurement")
    loader.add_argument("--loader-warmup", type=int, default=5, help="untimed batches per loader measurement")
    train = parser.add_argument_group("training step")
    train.add_argument("--train-mode", choices=("trainer", "random"), default="trainer",
                       help="'trainer': Trainer.train_step() on the prepared data; 'random': forward + backward + "
                            "AdamW on random ids")
    train.add_argument("--preset", default="helm_d_tiny", help="model preset name or YAML path")
    train.add_argument("--train-seq-len", type=int, default=256)
    train.add_argument("--train-micro-batch", type=int, default=8)
    train.add_argument("--train-steps", type=int, default=10, help="timed steps")
    train.add_argument("--train-warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and the tokenizer's pool)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.source == "local" and not args.paths and not args.data_dir:
        parser.error("--source local needs --paths")
    for name in ("threads", "train_steps", "vocab_size", "train_seq_len", "train_micro_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_documents is not None and args.max_documents < 1:
        parser.error("--max-documents must be >= 1")
    if args.train_warmup < 0 or args.loader_warmup < 0 or args.loader_seconds <= 0:
        parser.error("--train-warmup / --loader-warmup must be >= 0 and --loader-seconds > 0")
    if any(n < 2 for n in args.seq_len + [args.train_seq_len]) or any(b < 1 for b in args.micro_batch):
        parser.error("seq lens must be >= 2 and micro-batches >= 1")
    return args


# ------------------------------------------------------------------------------------------------ 1. preparation
def _mb_per_s(n_bytes: int, seconds: float) -> float:
    return round(n_bytes / 1e6 / max(seconds, 1e-9), 3)


def measure_read(config) -> dict:
    """Reading + decoding the documents alone (what preparation does besides tokenizing and writing)."""
    from helmlm.data.shards import iter_documents

    start = time.perf_counter()
    n_docs = n_bytes = 0
    for doc in iter_documents(config):
        n_docs += 1
        n_bytes += len(doc.encode("utf-8", "surrogatepass"))
    seconds = time.perf_counter() - start
    return {"read_s": round(seconds, 3), "read_mb_per_s": _mb_per_s(n_bytes, seconds), "documents": n_docs,
            "bytes": n_bytes}


def measure_prepare(args: argparse.Namespace, root: Path):
    """Prepare with BPE training into root/bpe, then with that tokenizer into root/pretrained; return the record
    and the DataConfig of root/bpe."""
    from helmlm.config import DataConfig
    from helmlm.data.shards import prepare_data, read_manifest

    config = DataConfig(source=args.source, paths=list(args.paths), text_field=args.text_field,
                        max_documents=args.max_documents, vocab_size=args.vocab_size, dir=str(root / "bpe"))
    if args.source == "builtin":  # download / build / verify the corpus outside the timed region
        from helmlm.data.builtin import build_builtin_corpus

        build_builtin_corpus(progress=True)
    read = measure_read(config)  # also warms the page cache for both timed runs alike
    log(f"prepare: {read['documents']:,} documents, {read['bytes'] / 1e6:.1f} MB (read + decode "
        f"{read['read_s']:.2f} s); training a BPE of {args.vocab_size} and tokenizing ...")

    start = time.perf_counter()
    prepare_data(config, progress=False)
    total_a = time.perf_counter() - start
    man_a = read_manifest(root / "bpe")

    pre = DataConfig(**{**vars(config), "tokenizer": str(root / "bpe" / "tokenizer"),
                        "dir": str(root / "pretrained")})
    log("prepare: again with the trained tokenizer (tokenize + write only) ...")
    start = time.perf_counter()
    prepare_data(pre, progress=False)
    total_b = time.perf_counter() - start
    man_b = read_manifest(root / "pretrained")

    splits = man_a["splits"]
    n_bytes, tw_a, tw_b = man_a["bytes_read"], man_a["seconds"], man_b["seconds"]
    same = all(man_a["splits"][s].get("tokens") == man_b["splits"][s].get("tokens") for s in splits)
    record = {
        "measurement": "prepare",
        "source": args.source,
        "paths": list(args.paths) or None,
        "max_documents": args.max_documents,
        "documents": man_a["documents_read"],
        "bytes": n_bytes,
        "mb": round(n_bytes / 1e6, 3),
        "vocab_size": man_a["tokenizer"]["size"],
        "train_tokens": splits["train"].get("tokens", 0),
        "val_tokens": splits["val"].get("tokens", 0),
        "bytes_per_token": round(n_bytes / max(1, splits["train"].get("tokens", 0) + splits["val"].get("tokens", 0)),
                                 3),
        # a. BPE training + tokenize + write
        "total_s": round(total_a, 3),
        "tokenizer_train_s": round(total_a - tw_a, 3),
        "tokenize_write_s": round(tw_a, 3),
        "tokenize_write_mb_per_s": _mb_per_s(n_bytes, tw_a),
        "total_mb_per_s": _mb_per_s(n_bytes, total_a),
        # b. pretrained tokenizer: tokenize + write alone
        "pretrained_total_s": round(total_b, 3),
        "pretrained_tokenize_write_s": round(tw_b, 3),
        "pretrained_tokenize_write_mb_per_s": _mb_per_s(n_bytes, tw_b),
        "pretrained_same_tokens": same,
        **read,
        "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"),
        "loadavg_1m": loadavg(),
    }
    return record, config


# ------------------------------------------------------------------------------------------------ 2. loader
def measure_loader(args: argparse.Namespace, data_dir: Path, seq_lens: list[int],
                   micro_batches: dict[int, list[int]]) -> list[dict]:
    from helmlm.data.packing import PackedRows, RowStream

    records = []
    for seq_len in seq_lens:
        start = time.perf_counter()
        rows = PackedRows(data_dir, "train", seq_len)
        build_s = time.perf_counter() - start
        st = rows.stats
        log(f"loader: seq_len {seq_len}: {st.rows:,} rows, {st.pieces:,} pieces, {st.efficiency:.2%} filled, "
            f"plan built in {build_s:.3f} s")
        for micro_batch in micro_batches[seq_len]:
            stream = RowStream(rows.num_rows, args.seed)
            for _ in range(args.loader_warmup):
                rows.batch(stream.global_batch(micro_batch, 1, 1, 0)[0])
            n_batches = real = 0
            index_s, times = 0.0, []
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                (indices,) = stream.global_batch(micro_batch, 1, 1, 0)
                t1 = time.perf_counter()
                batch = rows.batch(indices)
                t2 = time.perf_counter()
                real += int(batch["attention_mask"].sum())
                index_s += t1 - t0
                times.append(t2 - t0)
                n_batches += 1
                if t2 - start >= args.loader_seconds:
                    break
            elapsed = time.perf_counter() - start
            slots = n_batches * micro_batch * seq_len
            record = {
                "measurement": "loader",
                "seq_len": seq_len,
                "micro_batch": micro_batch,
                "rows": st.rows,
                "pieces": st.pieces,
                "documents": st.documents,
                "pieces_per_row": round(st.pieces / max(1, st.rows), 3),
                "packing_efficiency": round(st.efficiency, 5),
                "plan_build_s": round(build_s, 4),
                "batches": n_batches,
                "elapsed_s": round(elapsed, 3),
                "tokens_per_s": round(real / elapsed, 1),
                "slots_per_s": round(slots / elapsed, 1),
                "batch_efficiency": round(real / max(1, slots), 5),
                "batch_ms_median": round(1000 * statistics.median(times), 4),
                "index_share": round(index_s / elapsed, 4),
                "epochs_seen": round(stream.epoch, 3),
                "loadavg_1m": loadavg(),
            }
            log(f"  micro_batch {micro_batch}: {record['tokens_per_s'] / 1e6:.2f} M tokens/s "
                f"({record['batch_ms_median']:.3f} ms/batch)")
            emit(record)
            records.append(record)
    return records


# ------------------------------------------------------------------------------------------------ 3. training
def measure_train(args: argparse.Namespace, data_dir: Path, run_dir: Path) -> dict:
    import torch

    from helmlm.config import DataConfig
    from helmlm.data.shards import read_manifest

    manifest = read_manifest(data_dir)
    n_ids = manifest["tokenizer"]["size"]
    seq_len, micro_batch = args.train_seq_len, args.train_micro_batch

    if args.train_mode == "trainer":
        from helmlm.config import LogSettings, TrainConfig, TrainSettings
        from helmlm.training.trainer import Trainer

        steps = args.train_warmup + args.train_steps
        data = DataConfig(**{**manifest["spec"], "dir": str(data_dir)})  # the very spec it was prepared with
        config = TrainConfig(model={"preset": args.preset}, data=data,
                             train=TrainSettings(seq_len=seq_len, micro_batch=micro_batch, steps=steps,
                                                 device="cpu", precision="fp32", threads=args.threads,
                                                 seed=args.seed),
                             log=LogSettings(progress=False, tensorboard=False), out_dir=str(run_dir))
        if config.model_config().vocab_size < n_ids:
            config.model["vocab_size"] = n_ids
        config.validate()
        trainer = Trainer(config)
        model_config = trainer.model_config
        tokens_before = 0

        def step() -> tuple[float, int]:
            nonlocal tokens_before
            metrics = trainer.train_step()
            real, tokens_before = metrics["tokens"] - tokens_before, metrics["tokens"]
            return metrics["loss"], real
    else:
        from helmlm.models import HELMForCausalLM, load_config

        model_config = load_config(args.preset)
        if model_config.vocab_size < n_ids:
            model_config = load_config(args.preset, vocab_size=n_ids)
        if model_config.max_position_embeddings < seq_len:
            model_config.max_position_embeddings = seq_len
        torch.manual_seed(args.seed)
        model = HELMForCausalLM(model_config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, n_ids, (micro_batch, seq_len), generator=torch.Generator().manual_seed(args.seed))

        def step() -> tuple[float, int]:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item(), ids.numel()

    log(f"train: {args.train_mode} mode, {args.preset} "
        f"(vocab {model_config.vocab_size}), {args.train_warmup} warm-up + {args.train_steps} timed steps of "
        f"{micro_batch} x {seq_len}")
    loss = None
    for _ in range(args.train_warmup):
        loss, _ = step()
    times, real = [], 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    for _ in range(args.train_steps):
        t0 = time.perf_counter()
        loss, n = step()
        times.append(time.perf_counter() - t0)
        real += n
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu0
    record = {
        "measurement": "train",
        "mode": args.train_mode,
        "what": ("Trainer.train_step(): batch from the loader + loss + backward + clip + optimizers"
                 if args.train_mode == "trainer" else "forward + loss + backward + AdamW on random ids"),
        "preset": args.preset,
        "vocab_size": model_config.vocab_size,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "steps": args.train_steps,
        "warmup": args.train_warmup,
        "elapsed_s": round(elapsed, 3),
        "step_ms_median": round(1000 * statistics.median(times), 2),
        "step_ms_min": round(1000 * min(times), 2),
        "tokens_per_s": round(real / elapsed, 1),
        # the fastest step's rate: least affected by other processes on a shared machine
        "tokens_per_s_best_step": round(real / args.train_steps / min(times), 1),
        "slots_per_s": round(micro_batch * seq_len * args.train_steps / elapsed, 1),
        "loss": None if loss is None else round(loss, 4),
        "threads": torch.get_num_threads(),
        "cpu_s": round(cpu_s, 3),  # process CPU time over the timed steps (all threads); << threads x elapsed: busy
        "loadavg_1m": loadavg(),
    }
    log(f"  {record['tokens_per_s']:,.0f} tokens/s ({record['step_ms_median']:.0f} ms/step)")
    return record


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # before the tokenizers library starts its pool
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="helmlm-data-bench-")
    root = Path(tmp)
    try:
        if args.data_dir:
            data_dir = Path(args.data_dir)
        else:
            record, _ = measure_prepare(args, root)
            emit(record)
            data_dir = root / "bpe"

        seq_lens = list(dict.fromkeys(args.seq_len + [args.train_seq_len]))
        micro_batches = {n: list(args.micro_batch) if n in args.seq_len else [] for n in seq_lens}
        if args.train_micro_batch not in micro_batches[args.train_seq_len]:
            micro_batches[args.train_seq_len].append(args.train_micro_batch)
        loaders = measure_loader(args, data_dir, seq_lens, micro_batches)

        train = measure_train(args, data_dir, root / "run")
        emit(train)
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)

    at = next(r for r in loaders if r["seq_len"] == args.train_seq_len and r["micro_batch"] == args.train_micro_batch)
    ratio = at["tokens_per_s"] / max(train["tokens_per_s"], 1e-9)
    ratio_best = at["tokens_per_s"] / max(train["tokens_per_s_best_step"], 1e-9)  # the conservative one
    slowest = min(r["tokens_per_s"] for r in loaders)
    summary = {
        "summary": True,
        "loader_over_train": round(ratio, 2),
        "loader_tokens_per_s": at["tokens_per_s"],
        "loader_over_train_best_step": round(ratio_best, 2),
        "train_tokens_per_s": train["tokens_per_s"],
        "train_tokens_per_s_best_step": train["tokens_per_s_best_step"],
        "at": {"seq_len": args.train_seq_len, "micro_batch": args.train_micro_batch},
        "train_mode": args.train_mode,
        "slowest_loader_tokens_per_s": slowest,
        "criteria": {
            f"loader_over_train_at_least_{MIN_LOADER_OVER_TRAIN:g}": min(ratio, ratio_best) >= MIN_LOADER_OVER_TRAIN,
            "loader_at_least_1M_tokens_per_s": slowest >= MIN_LOADER_TOKENS_PER_S,
        },
        "threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "command": shlex.join([sys.executable, os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else argv)),
    }
    emit(summary)
    log(f"summary: loader {at['tokens_per_s'] / 1e6:.2f} M tokens/s / train {train['tokens_per_s']:,.0f} tokens/s "
        f"= {ratio:.1f}x (>= {MIN_LOADER_OVER_TRAIN:g} required)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
