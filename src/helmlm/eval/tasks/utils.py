"""Loaders for helmlm's local lm-eval tasks: JSONL files shipped next to this module, read without the hub.

lm-eval imports this file by path (``custom_dataset: !function utils.load_jsonl`` in the task YAMLs), so the data
files resolve relative to the package, whatever the working directory. A malformed line is an error naming the file
and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a ``ValueError`` naming the file and line for anything but one JSON object a
    line (blank lines are skipped)."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON "
                             "object") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def load_jsonl(**kwargs):
    """A ``datasets.DatasetDict`` with one split per ``.jsonl`` keyword: ``load_jsonl(train="data/x.jsonl",
    test=...)``, paths relative to this directory. lm-eval also passes the task's metadata as keywords (its
    ``version``, ...): those are not splits and are ignored."""
    import datasets

    splits = {k: v for k, v in kwargs.items() if isinstance(v, str) and v.endswith(".jsonl")}
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(HERE / file))
                                 for split, file in splits.items()})
