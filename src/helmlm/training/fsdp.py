"""FSDP2 for the Euclidean parts (``train.strategy=fsdp``), with manifold parameters kept out of sharding.

``fully_shard`` would turn a geoopt ``ManifoldParameter`` (the Lorentz embedding table) into a plain ``DTensor``, and
Riemannian Adam would then silently treat it as Euclidean. So every decoder layer and the root are sharded with the
manifold parameters passed as ``ignored_params``: those stay whole, replicated ``ManifoldParameter`` s, trained by
Riemannian Adam on every rank. Scalar parameters (temperatures, residual weights), which ``fully_shard`` rejects,
are replicated the same way. Their gradients are averaged here with one all-reduce per step (FSDP does not reduce
ignored parameters).

Checkpoints stay in the single-process format: every sharded tensor (parameters, Adam moments) is gathered to a full
tensor when saving and re-sharded like its parameter when loading, so a run can resume with another strategy or
world size.
"""

from __future__ import annotations

import geoopt
import torch
import torch.distributed as dist
from torch import nn


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters left out of sharding: manifold parameters, and scalars (attention temperatures, residual
    weights), which ``fully_shard`` cannot shard."""
    return [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter) or p.dim() == 0]


def shard_euclidean_parts(model: nn.Module) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embedding, final norm, head), ignoring manifold parameters.
    The model is modified in place (its parameters become ``DTensor`` s) and returned."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(replicated_parameters(model)) or None
    for layer in model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered for a ``DTensor`` (a collective: every rank must call it), as is otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) sharded like ``param`` when ``param`` is a ``DTensor`` of the same shape."""
    if is_dtensor(param) and not is_dtensor(value) and tuple(value.shape) == tuple(param.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def average_ignored_gradients(model: nn.Module) -> None:
    """All-reduce (mean), in one call, the gradients FSDP leaves alone: those of the replicated parameters."""
    grads = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    if grads and dist.is_initialized():
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping over a mix of sharded (``DTensor``) and replicated gradients; returns the norm
    before clipping (a plain tensor, equal on every rank)."""
    with_grad = [p for p in parameters if p.grad is not None]
    sharded = [p for p in with_grad if is_dtensor(p.grad)]
    plain = [p for p in with_grad if not is_dtensor(p.grad)]
    sq = torch.zeros((), device=with_grad[0].grad.device if with_grad else "cpu")
    if sharded:
        sq = sq + full(torch.nn.utils.get_total_norm([p.grad for p in sharded])) ** 2
    if plain:
        sq = sq + torch.nn.utils.get_total_norm([p.grad for p in plain]) ** 2
    total = sq.sqrt()
    if max_norm > 0 and total.isfinite():
        for group in (sharded, plain):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
