"""Tokenized shards: prepare a corpus once into memory-mapped token files, read them back without copies.

Layout of a prepared data directory::

    manifest.json            spec (what was asked for), tokenizer hash / size / EOS id, dtype, per-split shards
                             with token and document counts, text statistics, progress, ``complete``, and
                             ``warnings`` (messages also printed at preparation time: an empty validation split,
                             a BPE smaller than the vocabulary asked)
    tokenizer/               the tokenizer (``AutoTokenizer.from_pretrained`` loads it)
    train-00000.bin          raw token ids (uint16 when the vocabulary has < 65536 ids, else uint32)
    train-00000.idx.npy      int64 end offset of each document in the shard (every document ends with EOS)
    val-00000.bin ...

Preparation reads documents in a fixed order, splits them by a hash of their text (:func:`split_of`), tokenizes
batches of documents in parallel (the Rust tokenizer's thread pool) and flushes a shard per split every
``shard_tokens`` training tokens. Every file is written to a temporary name and renamed into place, and the manifest
is rewritten (atomically) after each flush with the number of source documents consumed, so an interrupted
preparation resumes where the last flush left it and never leaves a torn file behind. Bad input (a
:class:`DataError` such as an empty corpus or a binary file) in a directory that this preparation created leaves
nothing behind, so a retry starts clean.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from helmlm.config import DataConfig
from helmlm.data.sources import DataError, TextStats, hf_documents, local_documents, split_of
from helmlm.data.tokenizer import load_tokenizer, tokenizer_hash, tokenizer_size, train_bpe

FORMAT_VERSION = 1
SPLITS = ("train", "val")


def iter_documents(config: DataConfig, stats: TextStats | None = None, progress: bool = False) -> Iterator[str]:
    """The documents of ``config``'s source, in order, at most ``max_documents``."""
    if config.source == "builtin":
        from helmlm.data.builtin import build_builtin_corpus

        docs = local_documents([build_builtin_corpus(progress=progress) / "documents.jsonl"], "text", stats,
                               max_invalid_utf8=config.max_invalid_utf8)
    elif config.source == "local":
        docs = local_documents(config.paths, config.text_field, stats, max_invalid_utf8=config.max_invalid_utf8)
    else:
        docs = hf_documents(config.hf_name, config.hf_config, config.hf_split, config.text_field, stats=stats)
    for i, doc in enumerate(docs):
        if config.max_documents is not None and i >= config.max_documents:
            return
        yield doc


def documents_of_split(config: DataConfig, split: str) -> Iterator[str]:
    """The raw text of the ``train`` or ``val`` documents of ``config``'s source: the documents the prepared shards
    of that split hold (the same hash rule, :func:`~helmlm.data.sources.split_of`), for scoring a model with any
    tokenizer on them."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; have {', '.join(SPLITS)}")
    return (doc for doc in iter_documents(config) if split_of(doc, config.val_fraction) == split)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete {data_dir} and prepare again") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    _write_atomic(data_dir / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())


def _warn(warnings: list[str], message: str) -> None:
    """Print ``message`` as a warning (always, progress or not) and record it in ``warnings`` (the manifest's)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
    if message not in warnings:
        warnings.append(message)


def _remove_created(out: Path, existed: bool, made_parents: list[Path]) -> None:
    """Undo a fresh preparation: empty ``out`` if it existed (it was empty), else remove it and the parents made."""
    if existed:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in made_parents:  # nearest first; stop at the first one that is not empty (someone else's now)
        try:
            parent.rmdir()
        except OSError:
            break


def _spec_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def prepare_data(config: DataConfig, data_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """Prepare (or finish preparing) ``config`` into ``data_dir`` (default ``config.dir``); return the directory.

    A complete directory prepared with the same spec is reused as is; one prepared with another spec is an error
    (nothing is overwritten); an incomplete one resumes after the last flushed shard. A :class:`DataError` (bad
    input) during a fresh preparation (no directory, or an empty one) removes what it created; an interruption or
    any other error keeps the partial state to resume from.
    """
    config.validate()
    out = Path(data_dir or config.dir)
    spec = config.spec()
    manifest = read_manifest(out)
    if manifest is not None:
        if manifest.get("spec") != spec:
            difference = _spec_difference(manifest.get("spec", {}), spec)
            raise DataError(f"{out} holds data prepared with other settings ({difference}); choose another "
                            "data.dir, or delete that directory to prepare it again")
        if manifest.get("complete"):
            return out
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a helmlm data directory (no manifest.json); choose another data.dir")
    log = (lambda msg: print(f"prepare: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if manifest is not None:
        tokenizer = load_tokenizer(out / "tokenizer")
        if tokenizer_hash(tokenizer) != manifest["tokenizer"]["sha256"]:
            raise DataError(f"{out}/tokenizer does not match its manifest (hash differs); delete {out} and prepare "
                            "again")
        log(f"resuming after {manifest['documents_read']:,} documents")
        _tokenize_into(config, out, manifest, tokenizer, log, progress)
        return out

    existed = out.exists()
    made_parents, parent = [], out.parent
    while not parent.exists():
        made_parents.append(parent)
        parent = parent.parent
    out.mkdir(parents=True, exist_ok=True)
    try:
        warnings: list[str] = []
        tokenizer = _make_tokenizer(config, out / "tokenizer", log, progress, warnings)
        size = tokenizer_size(tokenizer)
        manifest = {"format": FORMAT_VERSION, "complete": False, "spec": spec,
                    "tokenizer": {"dir": "tokenizer", "sha256": tokenizer_hash(tokenizer), "size": size,
                                  "eos_id": tokenizer.eos_token_id},
                    "dtype": token_dtype(size).name, "documents_read": 0, "text": TextStats().to_dict(),
                    "bytes_read": 0, "seconds": 0.0, "splits": {s: {"shards": []} for s in SPLITS},
                    "warnings": warnings}
        _write_manifest(out, manifest)
        _tokenize_into(config, out, manifest, tokenizer, log, progress)
    except DataError:
        _remove_created(out, existed, made_parents)  # bad input: a retry must start clean, not "resume"
        raise
    return out


def _make_tokenizer(config: DataConfig, tok_dir: Path, log, progress: bool, warnings: list[str]):
    if config.tokenizer != "bpe":
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        start = time.perf_counter()
        cap = config.tokenizer_train_documents

        def texts() -> Iterator[str]:
            n, stats = 0, TextStats()
            for doc in iter_documents(config, stats, progress=progress):
                if split_of(doc, config.val_fraction) == "train":
                    yield doc
                    n += 1
                    if cap is not None and n >= cap:
                        return
            if n == 0:
                raise DataError(f"the corpus is empty: no training documents (source {config.source!r}, "
                                f"{stats.documents} non-empty documents, all in the validation split; "
                                f"{stats.empty} empty ones skipped); check data.paths / data.hf_name and "
                                "data.val_fraction")

        tokenizer = train_bpe(texts(), config.vocab_size)
        seconds = time.perf_counter() - start
        size = tokenizer_size(tokenizer)
        log(f"trained a byte-level BPE with {size:,} tokens in {seconds:.1f} s")
        if size < config.vocab_size:
            _warn(warnings, f"the byte-level BPE reached only {size:,} of the {config.vocab_size:,} tokens asked "
                            f"(data.vocab_size): the corpus is too small for more merges; the model's vocabulary "
                            f"should follow the tokenizer ({size:,}), as the trainer does unless model.vocab_size "
                            "is set")
    tmp = tok_dir.with_name(f".{tok_dir.name}.tmp-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    os.replace(tmp, tok_dir)
    return tokenizer


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a text is text, not a document end
    fast = getattr(backend, "encode_batch_fast", None)  # skips offsets (tokenizers >= 0.20)
    encodings = (fast or backend.encode_batch)(texts, add_special_tokens=False)
    return [e.ids for e in encodings]


def _tokenize_into(config: DataConfig, out: Path, manifest: dict[str, Any], tokenizer, log, progress: bool) -> None:
    from tqdm.auto import tqdm

    dtype = np.dtype(manifest["dtype"])
    eos = manifest["tokenizer"]["eos_id"]
    skip = manifest["documents_read"]
    stats = TextStats(**manifest["text"])
    buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    buffered = {s: 0 for s in SPLITS}
    state = {"read": skip, "bytes": manifest["bytes_read"], "start": time.perf_counter(), "t0": manifest["seconds"]}

    def flush(final: bool) -> None:
        for split in SPLITS:
            if not buffers[split]:
                continue
            shards = manifest["splits"][split]["shards"]
            name = f"{split}-{len(shards):05d}"
            lengths = np.fromiter((len(a) for a in buffers[split]), dtype=np.int64, count=len(buffers[split]))
            tokens = np.concatenate(buffers[split]).astype(dtype, copy=False)
            _write_atomic(out / f"{name}.bin", tokens.tobytes())
            ends = np.cumsum(lengths)
            tmp = out / f".{name}.idx.tmp-{os.getpid()}.npy"
            np.save(tmp, ends)
            os.replace(tmp, out / f"{name}.idx.npy")
            shards.append({"name": name, "tokens": int(tokens.size), "documents": int(lengths.size)})
            buffers[split], buffered[split] = [], 0
        for split in SPLITS:
            shards = manifest["splits"][split]["shards"]
            manifest["splits"][split]["tokens"] = sum(s["tokens"] for s in shards)
            manifest["splits"][split]["documents"] = sum(s["documents"] for s in shards)
        manifest.update(documents_read=state["read"], bytes_read=state["bytes"], text=stats.to_dict(),
                        seconds=state["t0"] + time.perf_counter() - state["start"], complete=final)
        _write_manifest(out, manifest)

    docs = iter_documents(config, stats, progress=progress)
    for _ in range(skip):  # resume: the source order is deterministic
        next(docs, None)
    stats.__dict__.update(manifest["text"])  # the skipped documents were counted before the interruption
    bar = tqdm(desc="tokenize", unit="doc", initial=skip, disable=not progress, mininterval=1.0)
    batch: list[str] = []

    def encode_batch() -> None:
        for doc, ids in zip(batch, _encode(tokenizer, batch)):
            split = split_of(doc, config.val_fraction)
            ids.append(eos)
            buffers[split].append(np.asarray(ids, dtype=dtype))
            buffered[split] += len(ids)
            state["bytes"] += len(doc.encode("utf-8", "surrogatepass"))
        state["read"] += len(batch)
        bar.update(len(batch))
        batch.clear()
        if buffered["train"] >= config.shard_tokens:
            flush(final=False)

    for doc in docs:
        batch.append(doc)
        if len(batch) >= config.batch_documents:
            encode_batch()
    if batch:
        encode_batch()
    bar.close()
    if state["read"] == 0:
        raise DataError(f"the corpus is empty (source {config.source!r}, {stats.empty} empty documents skipped); "
                        "check data.paths / data.hf_name")
    val_tokens = sum(s["tokens"] for s in manifest["splits"]["val"]["shards"]) + buffered["val"]
    if config.val_fraction > 0 and val_tokens == 0:
        _warn(manifest.setdefault("warnings", []),
              f"the validation split is empty ({state['read']:,} documents, data.val_fraction={config.val_fraction:g}"
              "): validation loss will not be reported; raise data.val_fraction or add documents")
    flush(final=True)
    splits = manifest["splits"]
    mb = manifest["bytes_read"] / 1e6
    log(f"{manifest['documents_read']:,} documents, {mb:.1f} MB of text -> {splits['train']['tokens']:,} train / "
        f"{splits['val']['tokens']:,} val tokens in {manifest['seconds']:.1f} s "
        f"({mb / max(manifest['seconds'], 1e-9):.1f} MB/s)")
    if stats.replaced_bytes:
        log(f"replaced {stats.replaced_bytes:,} invalid UTF-8 bytes with U+FFFD in "
            f"{stats.documents_with_replacements:,} documents")


class TokenShards:
    """The prepared tokens of one split, memory-mapped: ``doc_shard``, ``doc_start``, ``doc_length`` describe every
    document (EOS included); :meth:`tokens` returns a view of one span."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise DataError(f"{self.dir} is not a prepared data directory (no manifest.json); run "
                            f"`helmlm prepare` or `helmlm train` first")
        if not manifest.get("complete"):
            raise DataError(f"{self.dir}: preparation did not finish; run it again to resume")
        if split not in manifest["splits"]:
            raise DataError(f"unknown split {split!r}; have {', '.join(manifest['splits'])}")
        self.manifest, self.split = manifest, split
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = manifest["tokenizer"]["size"]
        self.eos_id = manifest["tokenizer"]["eos_id"]
        self.shards: list[np.ndarray] = []
        shard_of, starts, lengths = [], [], []
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            data = np.memmap(self.dir / f"{shard['name']}.bin", dtype=self.dtype, mode="r")
            ends = np.load(self.dir / f"{shard['name']}.idx.npy", allow_pickle=False)
            if data.size != shard["tokens"] or ends.size != shard["documents"] or (ends.size and ends[-1] != data.size):
                raise DataError(f"{self.dir}/{shard['name']} does not match the manifest; prepare the data again")
            self.shards.append(data)
            shard_of.append(np.full(ends.size, i, dtype=np.int32))
            starts.append(np.concatenate([[0], ends[:-1]]).astype(np.int64))
            lengths.append(np.diff(ends, prepend=0).astype(np.int64))
        empty = np.zeros(0, dtype=np.int64)
        self.doc_shard = np.concatenate(shard_of) if shard_of else empty.astype(np.int32)
        self.doc_start = np.concatenate(starts) if starts else empty
        self.doc_length = np.concatenate(lengths) if lengths else empty

    @property
    def num_documents(self) -> int:
        return int(self.doc_length.size)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_length.sum())

    def tokens(self, shard: int, start: int, length: int) -> np.ndarray:
        return self.shards[shard][start:start + length]

    def tokenizer(self):
        return load_tokenizer(self.dir / self.manifest["tokenizer"]["dir"])
