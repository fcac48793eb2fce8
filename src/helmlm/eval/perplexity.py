"""Perplexity and bits per byte of any causal LM (helmlm or transformers) over documents.

Every document is scored from its own start: its first token is predicted from the tokenizer's BOS token (its EOS
token when it has no BOS), as lm-evaluation-harness's rolling log-likelihood does, so every token of the document
counts and bits per byte compare across tokenizers. A document longer than the context is scored with a sliding
window: windows of at most ``context_length`` tokens advance by ``stride`` tokens, and each window scores only the
targets not scored before, so every target is predicted once, with at least ``context_length - stride`` tokens of
context (all of them in the first window). ``stride = context_length`` gives disjoint windows (fastest); smaller
strides give more context per prediction and cost more forwards.

Windows of all documents are batched (right-padded with an attention mask; a causal model's real tokens never see the
padding) and losses are summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from helmlm.errors import DataError, InputError


@dataclass(frozen=True)
class Window:
    """One forward: ``ids`` (at most ``context_length`` tokens) whose last ``scored`` targets count."""

    ids: list[int]
    scored: int


def windows(tokens: list[int], context_length: int, stride: int) -> Iterator[Window]:
    """The windows that score ``tokens[1:]`` (``tokens[0]`` is the BOS/EOS prefix) once each.

    A window's input is ``tokens[start:end]``; its predictions are ``tokens[start + 1:end + 1]``, of which the last
    ``scored`` are new."""
    n_targets = len(tokens) - 1
    done = 0
    while done < n_targets:
        end = min(done + stride, n_targets) if done else min(context_length, n_targets)
        start = max(0, end - context_length)
        yield Window(tokens[start:end + 1], end - done)
        done = end


def _target_nll(model: nn.Module, batch: list[Window], pad_id: int, device: torch.device) -> torch.Tensor:
    """Summed negative log-likelihood (fp64) of the scored targets of a batch of windows."""
    width = max(len(w.ids) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width - 1), dtype=torch.long)
    for row, w in enumerate(batch):
        ids[row, : len(w.ids)] = torch.tensor(w.ids)
        mask[row, : len(w.ids) - 1] = 1
    inputs, targets = ids[:, :-1].to(device), ids[:, 1:].to(device)
    logits = model(input_ids=inputs, attention_mask=mask.to(device)).logits
    total = torch.zeros((), dtype=torch.float64, device=device)
    for row, w in enumerate(batch):  # row by row: a float64 copy of one row's scored logits, not of the batch's
        end = len(w.ids) - 1
        scored = logits[row, end - w.scored: end].double().log_softmax(-1)
        total -= scored.gather(-1, targets[row, end - w.scored: end, None]).sum()
    return total


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, documents: Iterable[str], context_length: int | None = None,
               stride: int | None = None, batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> dict[str, float | int]:
    """Token-level loss (nats), perplexity and bits per byte of ``model`` over ``documents``.

    ``context_length`` defaults to the model's ``max_position_embeddings`` (the window includes the BOS/EOS
    prefix), ``stride`` to ``context_length``. ``progress`` is called with the number of documents done. Returns
    ``{"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents", "context_length", "stride"}``."""
    if context_length is None:
        context_length = getattr(model.config, "max_position_embeddings", None)
    if not context_length or context_length < 2:
        raise InputError(f"context_length must be >= 2 (the prefix token and one target), got {context_length}")
    stride = context_length if stride is None else stride
    if not 1 <= stride <= context_length:
        raise InputError(f"stride must be in [1, context_length={context_length}], got {stride}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise InputError("the tokenizer has neither a BOS nor an EOS token to start each document from")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tokens, n_bytes, n_docs, pending = torch.zeros((), dtype=torch.float64), 0, 0, 0, []
    from transformers import PreTrainedTokenizerBase

    # long documents are windowed: transformers' warning about sequences longer than the model's is noise here
    quiet = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False, **quiet).input_ids
        if not ids:
            continue
        n_docs, n_tokens, n_bytes = n_docs + 1, n_tokens + len(ids), n_bytes + len(text.encode("utf-8"))
        pending.extend(windows([prefix, *ids], context_length, stride))
        while len(pending) >= batch_size:
            total += _target_nll(model, pending[:batch_size], pad_id, device).cpu()
            del pending[:batch_size]
        if progress is not None:
            progress(n_docs)
    if pending:
        total += _target_nll(model, pending, pad_id, device).cpu()
    model.train(was_training)
    if n_tokens == 0:
        raise DataError("no text to score: every document was empty or encoded to no tokens")
    loss = total.item() / n_tokens
    bits_per_byte = total.item() / math.log(2) / n_bytes
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bits_per_byte,
            "tokens": n_tokens, "bytes": n_bytes, "documents": n_docs, "context_length": context_length,
            "stride": stride}
