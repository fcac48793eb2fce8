"""``helmlm smoke``: a forward/backward sanity check of a model preset on one fixed random batch.

It builds the model, fits one batch for a few steps with the trainer's optimizer split (AdamW + Riemannian Adam for
the Lorentz table), and reports the loss before and after and the training tokens/s (step 0, the warm-up, untimed).
No data, no checkpoints: the quickest way to see that a config builds, learns and how fast it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from helmlm.errors import TrainingError
from helmlm.models import HELMForCausalLM, load_config
from helmlm.models.params import count_parameters
from helmlm.training.optim import build_optimizer


def smoke_run(config: str = "helm_d_tiny", steps: int = 20, batch: int = 4, seq_len: int = 128, lr: float = 3e-3,
              seed: int = 0, bf16: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit one random ``batch x seq_len`` batch for ``steps`` steps; return ``params``, ``loss_first``,
    ``loss_last`` and ``tokens_per_s``. ``log`` receives a header and the loss every ``steps / 5`` steps."""
    if min(steps, batch, seq_len) < 1:
        raise TrainingError(f"steps, batch and seq_len must be >= 1; got {steps}, {batch}, {seq_len}")
    torch.manual_seed(seed)
    model_config = load_config(config, max_position_embeddings=seq_len)
    model = HELMForCausalLM(model_config).train()
    n_params = count_parameters(model_config)["total"]
    optimizer = build_optimizer(model, lr, weight_decay=0.0)
    ids = torch.randint(0, model_config.vocab_size, (batch, seq_len))
    log(f"helmlm smoke: {model_config.geometry} model, {n_params:,} parameters, batch {batch} x {seq_len} tokens, "
        f"{torch.get_num_threads()} threads{', bf16 autocast' if bf16 else ''}")
    losses, start = [], time.perf_counter()
    for step in range(steps + 1):  # step 0 is a warm-up, not timed
        if step == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss {loss.item()} at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"  step {step:4d}  loss {losses[-1]:.4f}")
    tokens_per_s = batch * seq_len * steps / (time.perf_counter() - start)
    return {"params": n_params, "loss_first": losses[0], "loss_last": losses[-1], "tokens_per_s": tokens_per_s}
