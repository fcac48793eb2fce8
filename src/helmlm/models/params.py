"""Parameter accounting: counts for a config without allocating weights, and width matching for twins."""

from __future__ import annotations

import torch

from helmlm.models.config import HELMConfig


def count_parameters(config: HELMConfig) -> dict[str, int]:
    """Trainable parameter counts of the model a config builds (on the meta device, so free for 1B models).

    Returns ``total``, ``embedding`` (token table), ``head`` (LM head), ``non_embedding`` (the rest) and
    ``active``: the parameters one token uses, i.e. ``total`` less, in every routed layer, the ``E - k`` routed
    experts it does not select (the paper's convention: embedding and head count as active).
    """
    from helmlm.models.modeling import HELMForCausalLM
    from helmlm.nn.routing import routed_layers

    with torch.device("meta"):
        model = HELMForCausalLM(config)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.model.embed.weight.numel()
    head = model.lm_head.weight.numel()
    inactive = 0
    for _, layer in routed_layers(model):
        per_expert = sum(p.numel() for p in layer.experts.parameters() if p.requires_grad) // layer.gate.n_experts
        inactive += (layer.gate.n_experts - layer.gate.topk) * per_expert
    return {"total": total, "embedding": embedding, "head": head, "non_embedding": total - embedding - head,
            "active": total - inactive}


def matched_intermediate_size(config: HELMConfig, target_total: int, field: str = "intermediate_size") -> int:
    """The value of ``field`` (an FFN width) that brings ``config``'s total parameter count closest to
    ``target_total``.

    Used to build Euclidean twins with the same parameter count as a hyperbolic model (an FFN width is the
    free knob, ``moe_intermediate_size`` for MoE twins; everything else is kept).
    """
    def total(size: int) -> int:
        return count_parameters(HELMConfig(**{**config.to_dict(), field: size}))["total"]

    base, per_unit = total(2), total(3) - total(2)
    size = max(2, round((target_total - base) / per_unit) + 2)
    return min((size - 1, size, size + 1), key=lambda s: abs(total(s) - target_total) if s >= 2 else float("inf"))
