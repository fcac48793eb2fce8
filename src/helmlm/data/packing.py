"""Packing documents into rows of ``seq_len`` tokens, and a deterministic, resumable, rank-sliced batch stream.

**Pieces.** A document longer than ``seq_len`` is cut into ``seq_len``-token pieces plus its tail; nothing is
truncated or dropped (the reference drops tails). **Rows.** Pieces are packed into rows by best-fit decreasing over
the whole split (each piece goes to the fullest row that still has room), which packs at least as tightly as the
paper's online first-fit over a window of ``packing_ratio x rows`` documents; what is left of a row is padding
(``attention_mask`` 0). Each piece is its own document in the row (``document_ids``), so attention and next-token
targets never cross a piece boundary, and ``position_ids`` restart at 0 per piece when ``reset_positions`` is set.
Every token of the split appears in exactly one row: :func:`pack_stats` counts them.

**Order.** Row ``k`` of the (infinite) stream is row ``perm_e[k mod R]`` of epoch ``e = k div R``, where ``perm_e``
is a permutation seeded by ``(seed, e)``. A stream position is one integer, which makes resuming exact, and rank
``r`` of ``W`` takes its micro-batches from fixed slices of each global batch, so the union over ranks is the same
global batch for any ``W``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helmlm.data.shards import DataError, TokenShards


def split_documents(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut documents into pieces of at most ``seq_len`` tokens: ``(document index, offset in it, length)``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = -(-lengths // seq_len)  # ceil
    doc = np.repeat(np.arange(lengths.size), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    offset = (np.arange(doc.size) - first) * seq_len
    return doc, offset, np.minimum(lengths[doc] - offset, seq_len)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Assign items (each ``<= capacity``) to bins: longest first, each into the fullest bin it fits in, else a new
    bin. Returns the bin of every item. Open bins are bucketed by their free space (at most ``capacity + 1``
    distinct values), so each item costs O(log capacity)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    assignment = np.empty(len(lengths), dtype=np.int64)
    free_values: list[int] = []          # sorted distinct free-space values of open bins
    buckets: dict[int, list[int]] = {}   # free space -> open bins with that much room
    n_bins = 0
    for item in order:
        size = int(lengths[item])
        i = bisect.bisect_left(free_values, size)
        if i < len(free_values):
            free = free_values[i]
            bins = buckets[free]
            b = bins.pop()
            if not bins:
                del buckets[free], free_values[i]
        else:
            free, b = capacity, n_bins
            n_bins += 1
        assignment[item] = b
        left = free - size
        if left > 0:
            if left not in buckets:
                buckets[left] = []
                bisect.insort(free_values, left)
            buckets[left].append(b)
    return assignment


@dataclass
class PackStats:
    rows: int
    tokens: int
    padding: int
    documents: int
    pieces: int

    @property
    def efficiency(self) -> float:
        """Share of row slots holding real tokens."""
        return self.tokens / max(1, self.tokens + self.padding)


class PackedRows:
    """The rows of one split: row ``i`` is a list of pieces (shard, start, length) filling at most ``seq_len``."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, reset_positions: bool = False):
        if seq_len < 2:
            raise DataError(f"seq_len must be >= 2, got {seq_len}")
        self.shards = TokenShards(data_dir, split)
        self.seq_len, self.reset_positions = seq_len, reset_positions
        s = self.shards
        doc, offset, length = split_documents(s.doc_length, seq_len)
        row_of = best_fit_decreasing(length, seq_len)
        order = np.lexsort((-length, row_of))  # by row, longest piece first within a row
        self.piece_shard = s.doc_shard[doc][order]
        self.piece_start = (s.doc_start[doc] + offset)[order]
        self.piece_length = length[order]
        self.row_ptr = np.searchsorted(row_of[order], np.arange(row_of.max() + 2 if row_of.size else 1))
        self.stats = PackStats(rows=self.num_rows, tokens=int(length.sum()),
                               padding=self.num_rows * seq_len - int(length.sum()),
                               documents=s.num_documents, pieces=int(length.size))

    @property
    def num_rows(self) -> int:
        return int(self.row_ptr.size - 1)

    def batch(self, rows: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``document_ids``, ``position_ids``, ``attention_mask`` (all ``(B, seq_len)`` int64) for
        the given rows. Pieces are numbered 0, 1, ... within a row; padding has ``attention_mask`` 0."""
        n = self.seq_len
        ids = np.full((len(rows), n), self.shards.eos_id, dtype=np.int64)
        docs = np.zeros((len(rows), n), dtype=np.int64)
        pos = np.broadcast_to(np.arange(n), (len(rows), n)).copy()
        mask = np.zeros((len(rows), n), dtype=np.int64)
        for b, r in enumerate(rows):
            at = 0
            for j, p in enumerate(range(self.row_ptr[r], self.row_ptr[r + 1])):
                length = int(self.piece_length[p])
                ids[b, at:at + length] = self.shards.tokens(int(self.piece_shard[p]), int(self.piece_start[p]), length)
                docs[b, at:at + length] = j
                if self.reset_positions:
                    pos[b, at:at + length] = np.arange(length)
                at += length
            mask[b, :at] = 1
        return {"input_ids": torch.from_numpy(ids), "document_ids": torch.from_numpy(docs),
                "position_ids": torch.from_numpy(pos), "attention_mask": torch.from_numpy(mask)}


class RowStream:
    """Deterministic infinite stream of row indices over epochs (see the module docstring); ``position`` is the
    number of rows consumed by all ranks together, the only state a checkpoint needs."""

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True, position: int = 0):
        if num_rows < 1:
            raise DataError("the split has no rows; the corpus is too small or val_fraction too low")
        self.num_rows, self.seed, self.shuffle, self.position = num_rows, seed, shuffle, position
        self._epoch, self._perm = -1, np.arange(num_rows)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows) if self.shuffle
                          else np.arange(self.num_rows))
        return self._perm

    def rows(self, start: int, count: int) -> np.ndarray:
        """Row indices at stream positions ``start .. start + count - 1``."""
        out = np.empty(count, dtype=np.int64)
        for i, k in enumerate(range(start, start + count)):
            out[i] = self._order(k // self.num_rows)[k % self.num_rows]
        return out

    def global_batch(self, micro_batch: int, accumulation: int, world_size: int, rank: int) -> list[np.ndarray]:
        """The ``accumulation`` micro-batches of rank ``rank`` for the next optimizer step, and advance."""
        per_micro = micro_batch * world_size
        out = [self.rows(self.position + m * per_micro + rank * micro_batch, micro_batch)
               for m in range(accumulation)]
        self.position += per_micro * accumulation
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.num_rows


def data_summary(data_dir: str | Path, seq_len: int) -> dict:
    """What a prepared data directory holds: documents, train/val tokens, tokenizer size, replaced bytes, rows of
    ``seq_len`` and their packing efficiency, and the preparation's warnings (``helmlm prepare`` prints this)."""
    rows = PackedRows(data_dir, "train", seq_len)
    manifest = rows.shards.manifest
    return {"dir": str(data_dir), "documents": manifest["documents_read"],
            "train_tokens": manifest["splits"]["train"]["tokens"], "val_tokens": manifest["splits"]["val"]["tokens"],
            "tokenizer_size": manifest["tokenizer"]["size"], "replaced_bytes": manifest["text"]["replaced_bytes"],
            "rows": rows.num_rows, "seq_len": rows.seq_len, "packing_efficiency": round(rows.stats.efficiency, 4),
            "warnings": manifest.get("warnings", [])}
