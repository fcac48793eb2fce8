"""Text sources: each yields documents (strings) in a deterministic order.

- :func:`local_documents`: files, directories (files of the known types below, recursively; others are skipped)
  or globs of plain text (``.txt``/``.md``/``.text``: one document per file),
  JSON lines (``.jsonl``/``.json``: one document per line, field ``text_field``) and parquet (one per row, column
  ``text_field``); any of them may be gzip-compressed (``.gz``). A text/JSONL file whose share of invalid UTF-8
  bytes exceeds ``max_invalid_utf8`` (default 1 %) is refused before any of its documents is yielded (it is binary
  or in another encoding); below that, invalid UTF-8 is replaced by U+FFFD and counted in :class:`TextStats`
  (never silently dropped, never a crash).
- :func:`hf_documents`: any Hugging Face dataset by name / config / split, streamed (the paper's corpus is
  ``wikimedia/wikipedia``, config ``20231101.en``); only touched when asked for, and it needs ``helmlm[data]``.
- :func:`split_of`: the train/validation split of a document, decided by a hash of its text, so it does not depend
  on order, sharding or how far a previous preparation got, and duplicates never straddle the split.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from helmlm.errors import DataError  # noqa: F401  (re-exported)

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)



@dataclass
class TextStats:
    """Counts kept while reading: documents yielded, empty ones skipped, invalid UTF-8 bytes replaced."""

    documents: int = 0
    empty: int = 0
    replaced_bytes: int = 0
    documents_with_replacements: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


_ESCAPED = re.compile("[\udc80-\udcff]")


def decode_utf8(data: bytes, stats: TextStats | None = None) -> str:
    """Decode UTF-8, replacing every invalid byte by U+FFFD and counting those bytes in ``stats``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # surrogateescape maps each undecodable byte to one lone surrogate U+DC80..U+DCFF: count, then replace them.
    text, replaced = _ESCAPED.subn("\ufffd", data.decode("utf-8", "surrogateescape"))
    if stats is not None:
        stats.replaced_bytes += replaced
        stats.documents_with_replacements += 1
    return text


def invalid_utf8_bytes(data: bytes) -> int:
    """Number of bytes of ``data`` that are not valid UTF-8 (each one becomes one U+FFFD in :func:`decode_utf8`)."""
    try:
        data.decode("utf-8")
        return 0  # the common case: one strict decode, no regex
    except UnicodeDecodeError:
        pass
    return _ESCAPED.subn("", data.decode("utf-8", "surrogateescape"))[1]


def _percent(share: float) -> str:
    return f"{100 * share:.1f}" if share >= 0.1 else f"{100 * share:.2f}"


def check_utf8_share(path: Path, data: bytes, max_invalid_utf8: float) -> int:
    """The number of invalid UTF-8 bytes of ``data`` (the content of ``path``); a :class:`DataError` naming the file
    and the share when that share of its bytes exceeds ``max_invalid_utf8``."""
    invalid = invalid_utf8_bytes(data)
    if invalid and invalid / len(data) > max_invalid_utf8:
        share = invalid / len(data)
        raise DataError(f"{path}: {_percent(share)} % of its {len(data):,} bytes ({invalid:,}) are not valid UTF-8, "
                        f"more than the {_percent(max_invalid_utf8)} % allowed by data.max_invalid_utf8; it looks "
                        "like a binary file or text in another encoding: convert it to UTF-8 or leave it out, or "
                        "set data.max_invalid_utf8=1 to accept it anyway (invalid bytes become U+FFFD)")
    return invalid


def split_of(text: str, val_fraction: float) -> str:
    """``"val"`` for a ``val_fraction`` share of documents chosen by a hash of the text, else ``"train"``."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2**64 else "train"


def expand_paths(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by ``patterns`` (paths, directories, or globs with ``**``), sorted within each pattern."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            matches = sorted(q for q in p.rglob("*") if q.is_file() and _kind(q) is not None)
        elif p.is_file():
            matches = [p]
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not matches:
            raise DataError(f"no files match {str(pattern)!r}; give existing text/JSONL/parquet files, a directory "
                            "or a glob such as 'corpus/**/*.jsonl'")
        files.extend(matches)
    return files


def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _read_bytes(path: Path) -> bytes:
    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
        return f.read()


def local_documents(paths: Sequence[str | Path], text_field: str = "text", stats: TextStats | None = None, *,
                    max_invalid_utf8: float = 0.01) -> Iterator[str]:
    """Documents of local files (see the module docstring), in file order; empty documents are skipped. A text or
    JSONL file with more than a ``max_invalid_utf8`` share of invalid UTF-8 bytes (over the whole file, checked
    before any of its documents is yielded) is a :class:`DataError`; 1.0 accepts anything."""
    stats = stats if stats is not None else TextStats()
    for path in expand_paths(paths):
        kind = _kind(path)
        if kind is None:
            raise DataError(f"{path}: unknown file type; use .txt/.md (one document per file), .jsonl (one JSON "
                            f"object per line with a {text_field!r} field) or .parquet (a {text_field!r} column)")
        if kind == "text":
            data = _read_bytes(path)
            check_utf8_share(path, data, max_invalid_utf8)
            texts: Iterator[str] = iter([decode_utf8(data, stats)])
        elif kind == "jsonl":
            data = _read_bytes(path)
            check_utf8_share(path, data, max_invalid_utf8)
            texts = _jsonl_texts(path, data, text_field, stats)
        else:
            texts = _parquet_texts(path, text_field)
        for text in texts:
            if text.strip():
                stats.documents += 1
                yield text
            else:
                stats.empty += 1


def _jsonl_texts(path: Path, data: bytes, text_field: str, stats: TextStats) -> Iterator[str]:
    for lineno, line in enumerate(io.BytesIO(data), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(decode_utf8(line, stats))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no string field {text_field!r} (found {keys}); set data.text_field")
        yield record[text_field]


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; pip install 'helmlm[data]'") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); set data.text_field")
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        yield from (t if t is not None else "" for t in batch.column(0).to_pylist())  # nulls count as empty


def hf_documents(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
                 streaming: bool = True, stats: TextStats | None = None) -> Iterator[str]:
    """Documents of a Hugging Face dataset (streamed by default; downloads happen here and only here)."""
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets are not installed; pip install 'helmlm[data]'") from None
    stats = stats if stats is not None else TextStats()
    dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    for record in dataset:
        text = record.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"dataset {name!r} has no string field {text_field!r} (fields: {sorted(record)}); "
                            "set data.text_field")
        if text.strip():
            stats.documents += 1
            yield text
        else:
            stats.empty += 1
