"""Tokenizers: train a byte-level BPE on a corpus, or load any Hugging Face tokenizer; save it with the data.

Both paths give a ``transformers.PreTrainedTokenizerFast`` with an EOS token, saved to ``<data dir>/tokenizer`` by
the preparation step, so that training, evaluation and generation read the very same files. A tokenizer is
identified by :func:`tokenizer_hash` (sha256 of its canonical ``tokenizer.json``), which the shard manifest records
and the trainer checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from helmlm.data.sources import DataError

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, length: int | None = None):
    """A byte-level BPE (GPT-2 style pre-tokenisation; every byte is in the alphabet, so no input is unknown)
    trained on ``texts``, with ``<|endoftext|>`` as its only special token (EOS, also used for padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs >= 258 (256 bytes, "
                        "EOS and at least one merge)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    if tokenizer.get_vocab_size() <= 257:
        raise DataError("the corpus is too small to learn any BPE merge; give more text or a pretrained tokenizer")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def load_tokenizer(name_or_path: str | Path):
    """A fast Hugging Face tokenizer from a local directory or a hub name (the hub is contacted only for names that
    are not local directories). It must have an EOS token, which ends every document."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    except (OSError, ValueError) as err:
        where = "directory" if Path(name_or_path).exists() else "directory or hub name"
        raise DataError(f"cannot load a tokenizer from {str(name_or_path)!r} ({where}): {err}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {str(name_or_path)!r} has no fast (Rust) version; convert it first")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {str(name_or_path)!r} has no EOS token; documents must end with one")
    return tokenizer


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (model, merges, normalisation, special tokens)."""
    canonical = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_size(tokenizer) -> int:
    """Number of token ids the tokenizer can emit (base vocabulary plus added tokens): the smallest valid model
    ``vocab_size``."""
    return len(tokenizer)
