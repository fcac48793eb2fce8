"""Expert curvatures and loads of a routed model (HELM-MiCE, or the DeepSeek-style twin) over a corpus.

:func:`expert_loads` runs the model in evaluation mode over rows of corpus tokens and counts, per routed layer, the
share of (token, slot) choices that went to each expert, through a forward hook on each gate: the layers' own
statistics buffers count in training mode only (so that evaluation never feeds the balancing bias), and this keeps
it that way. MiCE layers also report their experts' learned curvatures.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from helmlm.nn.routing import routed_layers


@torch.no_grad()
def expert_loads(model: nn.Module, ids: Tensor, seq_len: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """``{"tokens": n, "layers": {name: {"load", "mean_score", "curvatures"?, "load_entropy"}}}`` over the token
    ids ``ids (n,)``, cut into rows of ``seq_len`` (default: 256 or the model's context if shorter; the last, shorter
    row included). ``load`` sums to 1 per layer;
    ``load_entropy`` is its entropy divided by log(experts): 1 when balanced, 0 when one expert takes everything.
    Empty ``layers`` for a model without routed layers."""
    layers = routed_layers(model)
    if seq_len is None:
        seq_len = min(256, getattr(getattr(model, "config", None), "max_position_embeddings", None) or 256)
    counts = {name: torch.zeros(layer.gate.n_routed_experts, dtype=torch.float64) for name, layer in layers}
    scores = {name: torch.zeros(layer.gate.n_routed_experts, dtype=torch.float64) for name, layer in layers}

    def hook(name: str):
        def count(_module, _args, output) -> None:
            _, indices, score = output
            counts[name] += torch.bincount(indices.flatten().cpu(), minlength=counts[name].numel()).double()
            scores[name] += score.flatten(0, -2).double().sum(0).cpu()
        return count

    handles = [layer.gate.register_forward_hook(hook(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        if layers:
            full = ids.numel() // seq_len * seq_len
            batches = list(ids[:full].view(-1, seq_len).split(batch_size))
            if full < ids.numel():
                batches.append(ids[full:].unsqueeze(0))  # the shorter last row on its own, never padded
            for batch in batches:
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out: dict[str, Any] = {"tokens": int(ids.numel()), "layers": {}}
    for name, layer in layers:
        load = counts[name] / counts[name].sum().clamp(min=1)
        nonzero = load[load > 0]
        entry = {"load": load.tolist(), "mean_score": (scores[name] / max(int(ids.numel()), 1)).tolist(),
                 "load_entropy": float(-(nonzero * nonzero.log()).sum() / math.log(load.numel()))
                 if load.numel() > 1 else 1.0}
        curvatures = getattr(layer.experts, "curvatures", None)
        if curvatures is not None:
            entry["curvatures"] = [float(c) for c in curvatures]
        out["layers"][name] = entry
    return out
