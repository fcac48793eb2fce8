"""Tokenized shards: prepare a corpus once into memory-mapped token files, read them back without copies.

Layout of a prepared data directory::

    manifest.json            spec (what was asked for), tokenizer hash / size / EOS id, dtype, per-split shards
                             (each with its token and document counts and ``files``: the size in bytes and sha256 of
                             its ``bin`` and ``idx`` files), text statistics, progress, ``complete``, and
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

Damaged shards are named and refused, never read silently. :class:`TokenShards` compares the size of every shard
file with the manifest before memory-mapping it (a ``stat`` per file), so a truncated or missing file is a
:class:`DataError` that names it. :func:`verify_shards` also hashes every file against the manifest's sha256, which
catches a file altered in place; it reads each shard once (sha256 runs at about 1.6 GB/s here, 2-core AMD EPYC,
streaming a cached file: about 1.3 s per billion uint16 tokens, plus the time to read them from disk), so it is run
once, before training. Directories prepared before the manifest recorded ``files`` still load and verify: their
``.bin`` sizes are checked against the token count, their index files by loading them, and nothing is hashed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from helmlm.config import DataConfig
from helmlm.data.sources import DataError, TextStats, hf_documents, local_documents, split_of
from helmlm.data.tokenizer import load_tokenizer, tokenizer_hash, tokenizer_size, train_bpe
from helmlm.storage import check_free_space, disk_errors, exclusive, file_sha256, is_bookkeeping

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
    """Write ``data`` to ``path`` through a temporary file (fsynced, then renamed); a failed write leaves neither."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    _write_atomic(data_dir / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())


def _warn(warnings: list[str], message: str) -> None:
    """Print ``message`` as a warning (always, progress or not) and record it in ``warnings`` (the manifest's)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
    if message not in warnings:
        warnings.append(message)


def _empty(out: Path) -> None:
    """Remove everything in ``out`` but its lock."""
    for child in out.iterdir():
        if not is_bookkeeping(child):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _remove_parents(made_parents: list[Path]) -> None:
    for parent in made_parents:  # nearest first; stop at the first one that is not empty (someone else's now)
        try:
            parent.rmdir()
        except OSError:
            break


def _spec_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def _is_complete(out: Path, spec: dict[str, Any]) -> bool:
    """Whether ``out`` holds complete data of ``spec``; data of another spec is an error (nothing is overwritten),
    and so is a directory that is not a data directory."""
    manifest = read_manifest(out)
    if manifest is None:
        if out.exists() and any(not is_bookkeeping(p) for p in out.iterdir()):
            raise DataError(f"{out} exists and is not a helmlm data directory (no manifest.json); choose another "
                            "data.dir")
        return False
    if manifest.get("spec") != spec:
        difference = _spec_difference(manifest.get("spec", {}), spec)
        raise DataError(f"{out} holds data prepared with other settings ({difference}); choose another "
                        "data.dir, or delete that directory to prepare it again")
    return bool(manifest.get("complete"))


def prepare_data(config: DataConfig, data_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """Prepare (or finish preparing) ``config`` into ``data_dir`` (default ``config.dir``); return the directory.

    A complete directory prepared with the same spec is reused as is (read without a lock); one prepared with
    another spec is an error (nothing is overwritten); an incomplete one resumes after the last flushed shard. The
    preparing process holds the directory's one-writer lock (:func:`helmlm.storage.exclusive`): a second one is
    refused. A :class:`DataError` (bad input) during a fresh preparation (no directory, or an empty one) removes
    what it created; an interruption, a full disk or any other error keeps the partial state to resume from.
    """
    config.validate()
    out = Path(data_dir or config.dir)
    if _is_complete(out, config.spec()):
        return out
    made_parents, parent = [], out.parent
    while not parent.exists():
        made_parents.append(parent)
        parent = parent.parent
    try:
        with exclusive(out, "this data directory"):
            if not _is_complete(out, config.spec()):  # another process may have finished it meanwhile
                _prepare_locked(config, out, progress)
    except DataError:
        _remove_parents(made_parents)
        raise
    return out


def _prepare_locked(config: DataConfig, out: Path, progress: bool) -> None:
    log = (lambda msg: print(f"prepare: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    manifest = read_manifest(out)
    if manifest is not None:
        tokenizer = load_tokenizer(out / "tokenizer")
        if tokenizer_hash(tokenizer) != manifest["tokenizer"]["sha256"]:
            raise DataError(f"{out}/tokenizer does not match its manifest (hash differs); delete {out} and prepare "
                            "again")
        log(f"resuming after {manifest['documents_read']:,} documents")
        _tokenize_into(config, out, manifest, tokenizer, log, progress)
        return
    try:
        warnings: list[str] = []
        tokenizer = _make_tokenizer(config, out / "tokenizer", log, progress, warnings)
        size = tokenizer_size(tokenizer)
        manifest = {"format": FORMAT_VERSION, "complete": False, "spec": config.spec(),
                    "tokenizer": {"dir": "tokenizer", "sha256": tokenizer_hash(tokenizer), "size": size,
                                  "eos_id": tokenizer.eos_token_id, "files": _file_records(out / "tokenizer")},
                    "dtype": token_dtype(size).name, "documents_read": 0, "text": TextStats().to_dict(),
                    "bytes_read": 0, "seconds": 0.0, "splits": {s: {"shards": []} for s in SPLITS},
                    "warnings": warnings}
        with disk_errors("the prepared data", out, then=_RESUME):
            _write_manifest(out, manifest)
        _tokenize_into(config, out, manifest, tokenizer, log, progress)
    except DataError:
        _empty(out)  # bad input: a retry must start clean, not "resume"
        raise


_RESUME = "what was flushed so far is kept: run the same command again to go on from there"


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
    try:
        with disk_errors("the tokenizer", tok_dir.parent, then=_RESUME):
            tokenizer.save_pretrained(tmp)
            if tok_dir.exists():
                shutil.rmtree(tok_dir)
            os.replace(tmp, tok_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a text is text, not a document end
    fast = getattr(backend, "encode_batch_fast", None)  # skips offsets (tokenizers >= 0.20)
    encodings = (fast or backend.encode_batch)(texts, add_special_tokens=False)
    return [e.ids for e in encodings]


def _write_shard(out: Path, name: str, documents: list[np.ndarray], dtype: np.dtype) -> dict[str, Any]:
    """Write one shard (tokens and document ends, each through a temporary file) and return its manifest entry:
    token and document counts, and each file's size and sha256 (hashed from memory, not read back)."""
    lengths = np.fromiter((len(a) for a in documents), dtype=np.int64, count=len(documents))
    tokens = np.concatenate(documents).astype(dtype, copy=False).tobytes()
    index = io.BytesIO()
    np.save(index, np.cumsum(lengths))
    files, what = {}, f"shard {name}"
    check_free_space(out, len(tokens) + index.tell(), what, then=_RESUME)
    for kind, data in (("bin", tokens), ("idx", index.getvalue())):
        with disk_errors(what, out, len(data), then=_RESUME):
            _write_atomic(out / f"{name}{_SUFFIX[kind]}", data)
        files[kind] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"name": name, "tokens": len(tokens) // dtype.itemsize, "documents": int(lengths.size), "files": files}


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
            shards.append(_write_shard(out, f"{split}-{len(shards):05d}", buffers[split], dtype))
            buffers[split], buffered[split] = [], 0
        for split in SPLITS:
            shards = manifest["splits"][split]["shards"]
            manifest["splits"][split]["tokens"] = sum(s["tokens"] for s in shards)
            manifest["splits"][split]["documents"] = sum(s["documents"] for s in shards)
        manifest.update(documents_read=state["read"], bytes_read=state["bytes"], text=stats.to_dict(),
                        seconds=state["t0"] + time.perf_counter() - state["start"], complete=final)
        with disk_errors("the data manifest", out, then=_RESUME):
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


_SUFFIX = {"bin": ".bin", "idx": ".idx.npy"}


def _prepare_again(data_dir: Path) -> str:
    return f"delete {data_dir} and prepare it again (`helmlm prepare` with the same config)"


def _shard_files(manifest: dict[str, Any], shard: dict[str, Any]) -> list[tuple[str, int | None, str | None]]:
    """``(file name, size in bytes, sha256)`` of each file of ``shard``; a manifest written before shards recorded
    their ``files`` gives the ``.bin`` size from the token count and ``None`` for the rest (not checked)."""
    files = shard.get("files", {})
    known = {"bin": shard["tokens"] * np.dtype(manifest["dtype"]).itemsize}
    return [(f"{shard['name']}{suffix}", files.get(kind, {}).get("bytes", known.get(kind)),
             files.get(kind, {}).get("sha256")) for kind, suffix in _SUFFIX.items()]


def _check_size(data_dir: Path, file: str, size: int | None) -> None:
    """A :class:`DataError` naming ``data_dir/file`` when it is missing or (``size`` known) of another size."""
    path = data_dir / file
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {_prepare_again(data_dir)}") from None
    if size is not None and actual != size:
        what = "truncated" if actual < size else "altered"
        raise DataError(f"{path} is {what}: {actual:,} bytes, the manifest says {size:,}; "
                        f"{_prepare_again(data_dir)}")


def _check_hash(data_dir: Path, file: str, sha256: str) -> None:
    """A :class:`DataError` naming ``data_dir/file`` when its sha256 is not ``sha256`` (or it cannot be read)."""
    try:
        actual = file_sha256(data_dir / file)
    except OSError as err:
        raise DataError(f"{data_dir / file} cannot be read ({err}); {_prepare_again(data_dir)}") from None
    if actual != sha256:
        raise DataError(f"{data_dir / file} is altered: its sha256 differs from the manifest's; "
                        f"{_prepare_again(data_dir)}")


def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of the files of ``directory`` (the tokenizer's, written just before)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and not is_bookkeeping(p)}


def _load_index(data_dir: Path, shard: dict[str, Any]) -> np.ndarray:
    """The document end offsets of ``shard``; a :class:`DataError` naming the file when it cannot be read or does
    not hold one offset per document of the manifest."""
    path = data_dir / f"{shard['name']}.idx.npy"
    try:
        ends = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path} cannot be read ({err}); {_prepare_again(data_dir)}") from None
    if ends.ndim != 1 or ends.size != shard["documents"]:
        raise DataError(f"{path} holds {ends.size:,} document offsets, the manifest says {shard['documents']:,}; "
                        f"{_prepare_again(data_dir)}")
    return ends


def verify_shards(data_dir: str | Path, splits: Iterable[str] = SPLITS) -> None:
    """Check every shard file of ``splits`` against the manifest of ``data_dir``: present and of the recorded size
    (all files, first: cheap), then of the recorded sha256 (reads each file once); then the tokenizer against its
    recorded hash. The first damaged file is a
    :class:`DataError` that names it, says what differs and what to do. Directories prepared before the manifest
    recorded ``files`` are checked by size (``.bin``) and by loading their index files; nothing is hashed."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise DataError(f"{data_dir} is not a prepared data directory (no manifest.json); run `helmlm prepare` or "
                        "`helmlm train` first")
    splits = list(splits)
    unknown = [s for s in splits if s not in manifest["splits"]]
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r}; have {', '.join(manifest['splits'])}")
    shards = [shard for split in splits for shard in manifest["splits"][split]["shards"]]
    for shard in shards:
        for file, size, _ in _shard_files(manifest, shard):
            _check_size(data_dir, file, size)
    for shard in shards:
        for file, _, sha256 in _shard_files(manifest, shard):
            if sha256 is not None:
                _check_hash(data_dir, file, sha256)
            elif file.endswith(_SUFFIX["idx"]):
                _load_index(data_dir, shard)
    _verify_tokenizer(data_dir, manifest)


def _verify_tokenizer(data_dir: Path, manifest: dict[str, Any]) -> None:
    """The tokenizer beside the shards is the one that made them (ids mean the same tokens): its files against the
    sizes and sha256s that the manifest recorded. Bytes, not the tokenizer's re-serialisation, so that a newer
    ``tokenizers`` writing the same tokenizer differently is not taken for a change. Manifests from before the
    tokenizer's files were recorded are not checked here (export still compares the checkpoint's hash)."""
    recorded = manifest.get("tokenizer", {})
    for name, expect in sorted(recorded.get("files", {}).items()):
        file = f"{recorded.get('dir', 'tokenizer')}/{name}"
        _check_size(data_dir, file, expect["bytes"])
        _check_hash(data_dir, file, expect["sha256"])


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
        for shard in manifest["splits"][split]["shards"]:
            for file, size, _ in _shard_files(manifest, shard):
                _check_size(self.dir, file, size)
        for i, shard in enumerate(manifest["splits"][split]["shards"]):
            path = self.dir / f"{shard['name']}.bin"
            try:
                data = np.memmap(path, dtype=self.dtype, mode="r")
            except (OSError, ValueError) as err:
                raise DataError(f"{path} cannot be read ({err}); {_prepare_again(self.dir)}") from None
            ends = _load_index(self.dir, shard)
            if data.size != shard["tokens"] or (ends.size and ends[-1] != data.size):
                raise DataError(f"{self.dir}/{shard['name']}.idx.npy does not match {path}: its documents end at "
                                f"token {int(ends[-1]) if ends.size else 0:,}, the shard holds {data.size:,} "
                                f"(the manifest says {shard['tokens']:,}); {_prepare_again(self.dir)}")
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
