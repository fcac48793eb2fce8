"""Parameter accounting: counts for a config without allocating weights."""

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
        gate = layer.gate
        per_expert = sum(p.numel() for p in layer.experts.parameters() if p.requires_grad) // gate.n_routed_experts
        inactive += (gate.n_routed_experts - gate.n_activated_experts) * per_expert
    return {"total": total, "embedding": embedding, "head": head, "non_embedding": total - embedding - head,
            "active": total - inactive}

