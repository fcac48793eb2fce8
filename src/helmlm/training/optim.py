"""Optimizer split and learning-rate schedule (MATH.md section 6).

- :func:`parameter_roles` assigns every trainable parameter one role: ``manifold`` (a geoopt
  ``ManifoldParameter``, the Lorentz embedding table), ``embedding`` (a Euclidean token table: the twins', or
  HELM's with ``project_emb``), ``decay`` (weight matrices: linear maps, stacked expert weights, the gate, the LM
  head) or ``no_decay`` (everything else: biases, norm weights, scales, residual weights, attention temperatures,
  expert curvatures).
- :func:`build_optimizer` gives manifold parameters to geoopt's Riemannian Adam (no weight decay: it is not a
  Riemannian operation) and the rest to AdamW with decoupled weight decay on the ``decay`` group only, behind one
  :class:`HybridOptimizer` (step / zero_grad / state_dict / load_state_dict / set_lr). Embedding tables get
  ``embedding_lr`` (their own AdamW group when it differs from ``lr``, else they join ``no_decay``).
- The Lorentz table's step size (:func:`riemannian_lr`). AdamW normalises every coordinate by its own second moment,
  so a Euclidean table row of ``D`` coordinates moves about ``lr * sqrt(D)`` per step. geoopt's Riemannian Adam keeps
  one second moment per row (``component_inner`` is the row's Minkowski inner product), so a Lorentz row moves about
  ``lr`` (in the Minkowski norm of its tangent step). ``riemannian_lr_scaling="sqrt_dim"`` (the default) gives
  Riemannian Adam ``embedding_lr * sqrt(n)``, ``n`` the table's tangent dimension, so both geometries' tables move
  alike at the same ``embedding_lr``; ``"none"`` is the reference's behaviour (Riemannian Adam at ``lr``).
- :func:`lr_multiplier`: linear warm-up, then cosine from 1 to ``min_lr_ratio``, correct for any ratio (the
  reference hard-codes 0.9 = 1 - 0.1 in its cosine, so only ``min_lr_ratio = 0.1`` ends where it should).
"""

from __future__ import annotations

import math
from typing import Any

import geoopt
import torch
from torch import nn

from helmlm.config import RIEMANNIAN_LR_SCALINGS

ROLES = ("manifold", "embedding", "decay", "no_decay")
_MATRIX_NAMES = ("weight", "w1", "w2", "w3")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """The learning-rate factor for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (so no step runs at lr 0); then
    ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (total - warmup)`` clamped to [0, 1]:
    1 right after warm-up, ``min_lr_ratio`` at the last step and after it.
    """
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"need total_steps >= 1, warmup_steps >= 0 and min_lr_ratio in [0, 1]; got "
                         f"{total_steps}, {warmup_steps}, {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """``{qualified name: role}`` for every trainable parameter (see the module docstring for the rule)."""
    from helmlm.nn.embedding import LorentzEmbedding

    roles = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            if isinstance(param, geoopt.ManifoldParameter):
                roles[name] = "manifold"
            elif isinstance(module, (nn.Embedding, LorentzEmbedding)):
                roles[name] = "embedding"
            elif param.dim() >= 2 and leaf in _MATRIX_NAMES:
                roles[name] = "decay"
            else:
                roles[name] = "no_decay"
    return roles


class HybridOptimizer:
    """Several torch optimizers stepped as one (here: AdamW and Riemannian Adam).

    ``param_groups`` lists every group of every optimizer; each group keeps its base ``initial_lr``, and
    :meth:`set_lr` sets ``lr = initial_lr * multiplier`` in all of them. ``state_dict`` holds one entry per
    optimizer, in order.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def set_lr(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"optimizer state holds {len(state['optimizers'])} optimizers, this one has "
                             f"{len(self.optimizers)}; was it saved for another model?")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


ZERO_STATE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, geoopt.optim.RiemannianAdam)


@torch.no_grad()
def allocate_state(optimizer: torch.optim.Optimizer | HybridOptimizer) -> int:
    """Create the optimizer state of every parameter that has none yet, now instead of at the first step, with the
    values the first step would create; return the number of parameters given state.

    Why (CPU): the moment buffers are the only tensors of a step that outlive it. Created at the end of the first
    step they land in the holes the step's freed activations left all over the heap, and with freed memory kept
    (``train.cpu_malloc=keep``) they split those holes for good: the next steps' activations no longer fit and the
    heap grows. Created before the first forward they sit next to the parameters. Measured on the reference
    comparison's step (HELM-D L2_W132, 8 x 1024, 1 thread): the heap above the baseline 370-470 -> 226-275 MB, the
    process's peak RSS 943-974 -> 834-859 MB (docs/LOG.md, 2026-12-01, third session).

    How: one step of the optimizer's own code with zero gradients at learning rate 0 (so the state has the types,
    shapes and devices its code gives it), then every state tensor is zeroed, integer step counters set to 0, and
    the parameters and gradients restored bit for bit. Only optimizers whose initial state is all zeros are touched
    (:data:`ZERO_STATE_OPTIMIZERS`); others are left to create theirs lazily.
    """
    if isinstance(optimizer, HybridOptimizer):
        return sum(allocate_state(opt) for opt in optimizer.optimizers)
    if not isinstance(optimizer, ZERO_STATE_OPTIMIZERS):
        return 0
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.requires_grad and not optimizer.state.get(p)]
    if not params:
        return 0
    fresh = set(params)
    kept = [(p, p.detach().clone(), p.grad) for p in params]
    # parameters that already have state sit this step out (no gradient), so their state is not touched
    others = [(p, p.grad) for group in optimizer.param_groups for p in group["params"] if p not in fresh]
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        for p, _ in others:
            p.grad = None
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p, value, grad in kept:
            p.copy_(value)
            p.grad = grad
        for p, grad in others:
            p.grad = grad
    for p in params:
        state = optimizer.state[p]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif key == "step":
                state[key] = type(value)(0)
    return len(params)


def riemannian_lr(table: torch.Tensor, embedding_lr: float, scaling: str = "sqrt_dim") -> float:
    """Riemannian Adam's lr for the Lorentz table ``table`` (``(V, n + 1)`` points): ``embedding_lr * sqrt(n)`` for
    ``scaling="sqrt_dim"`` (a row then moves as far per step as an AdamW row of ``n`` coordinates at
    ``embedding_lr``), ``embedding_lr`` for ``"none"``. The module docstring has the reasoning."""
    if scaling not in RIEMANNIAN_LR_SCALINGS:
        raise ValueError(f"riemannian_lr_scaling must be one of {', '.join(RIEMANNIAN_LR_SCALINGS)}, got {scaling!r}")
    return embedding_lr * math.sqrt(table.shape[-1] - 1) if scaling == "sqrt_dim" else embedding_lr


def can_fuse_adamw(params: list[torch.Tensor]) -> bool:
    """Whether AdamW can take these parameters in its fused kernel: plain (not distributed) floating-point tensors,
    all on one CPU or CUDA device. On CPU the fused step is one kernel per tensor where the default runs about ten:
    helm_d_small's 65 tensors 16.9 -> 4.9 ms per step, llama_small's 31 15.5 -> 4.5 (docs/LOG.md, 2026-12-01, fifth
    session); the values agree with the default to rounding. Sharded (DTensor) parameters keep the default."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            return False
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(p.is_floating_point()
                                                                                   for p in params)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)`` on its fused kernel where :func:`can_fuse_adamw` allows it
    (``params``: tensors or parameter groups). The trainer's and the benchmarks' one way to build AdamW."""
    params = list(params)
    tensors = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    return torch.optim.AdamW(params, fused=can_fuse_adamw(tensors) or None, **kwargs)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, riemannian_lr: float | None = None, embedding_lr: float | None = None,
                    riemannian_lr_scaling: str = "sqrt_dim") -> HybridOptimizer:
    """AdamW (decoupled weight decay on ``decay`` parameters only) + Riemannian Adam for manifold parameters.

    ``embedding_lr`` (default ``lr``): the token tables' learning rate, for both geometries. Riemannian Adam (on
    the Lorentz table) runs at ``riemannian_lr`` when given, else at :func:`riemannian_lr` of ``embedding_lr`` and
    ``riemannian_lr_scaling``, with ``stabilize=1`` (re-project the parameters onto the manifold after every step,
    as the reference does) and no weight decay. AdamW runs its fused kernel where it can (:func:`adamw`).
    """
    embedding_lr = lr if embedding_lr is None else embedding_lr
    params = dict(model.named_parameters())
    by_role: dict[str, list[torch.nn.Parameter]] = {role: [] for role in ROLES}
    for name, role in parameter_roles(model).items():
        by_role[role].append(params[name])
    if embedding_lr == lr:  # one group fewer: the optimizer state of runs from before the split still loads
        by_role["no_decay"] = by_role.pop("embedding") + by_role["no_decay"]
    groups = [{"params": by_role["decay"], "weight_decay": weight_decay, "role": "decay"},
              {"params": by_role["no_decay"], "weight_decay": 0.0, "role": "no_decay"}]
    if "embedding" in by_role:
        groups.append({"params": by_role["embedding"], "weight_decay": 0.0, "role": "embedding", "lr": embedding_lr})
    optimizers: list[torch.optim.Optimizer] = [adamw([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)]
    if by_role["manifold"]:
        table_lr = riemannian_lr if riemannian_lr is not None else \
            _table_lr(by_role["manifold"], embedding_lr, riemannian_lr_scaling)
        optimizers.append(geoopt.optim.RiemannianAdam(
            [{"params": by_role["manifold"], "role": "manifold"}], lr=table_lr,
            betas=betas, eps=eps, weight_decay=0.0, stabilize=1))
    return HybridOptimizer(optimizers)


def _table_lr(tables: list[torch.nn.Parameter], embedding_lr: float, scaling: str) -> float:
    rates = {riemannian_lr(t, embedding_lr, scaling) for t in tables}
    if len(rates) > 1:
        raise ValueError(f"manifold parameters of different widths would need different lrs ({sorted(rates)}); "
                         "set riemannian_lr explicitly")
    return rates.pop()
