"""Validation loss over packed rows: every target token counts once, whichever rank or batch holds it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from helmlm.data.packing import PackedRows
from helmlm.models.modeling import causal_lm_loss, lm_targets, padded_document_ids


@torch.no_grad()
def validation_loss(model: nn.Module, rows: PackedRows, micro_batch: int, max_rows: int = 0, *,
                    device: torch.device = torch.device("cpu"), autocast: torch.dtype | None = None,
                    rank: int = 0, world_size: int = 1,
                    all_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy over the targets of the first ``max_rows`` rows (0: all), its perplexity and
    the number of targets: ``{"val_loss", "val_ppl", "val_tokens"}``.

    Batches of ``micro_batch`` rows go round-robin over ``world_size`` ranks; every rank runs the same number of
    forwards (FSDP gathers parameters inside the forward), and ``all_reduce`` sums the (loss, count) pair across
    ranks. Losses are summed in fp64, so the result does not depend on how the rows are split. Routing statistics
    are not updated: the model runs in eval mode, and its previous mode is restored."""
    n_rows = rows.num_rows if max_rows == 0 else min(max_rows, rows.num_rows)
    starts = list(range(0, n_rows, micro_batch))
    rounds = -(-len(starts) // world_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for i in range(rank, rounds * world_size, world_size):
        real = i < len(starts)
        start = starts[i] if real else 0
        batch = rows.batch(list(range(start, min(start + micro_batch, n_rows))))
        docs = padded_document_ids(batch["document_ids"], batch["attention_mask"])
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(inputs["input_ids"], document_ids=inputs["document_ids"],
                           position_ids=inputs["position_ids"], attention_mask=inputs["attention_mask"]).logits
        ce_sum = causal_lm_loss(logits, inputs["input_ids"], docs.to(device), reduction="sum")
        if real:
            sums[1] += int((lm_targets(batch["input_ids"], docs) != -100).sum())
            sums[0] += ce_sum.double()
    if all_reduce is not None:
        all_reduce(sums)
    model.train(was_training)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(sums[1].item())}
