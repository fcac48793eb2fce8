"""Distributed training: the process group ``torchrun`` describes (:func:`init_distributed`, :class:`Distributed`),
and FSDP2 for the Euclidean parts (``train.strategy=fsdp``), with manifold parameters kept out of sharding.

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

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import geoopt
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from helmlm.errors import TrainingError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, device=dev)


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


@contextmanager
def stop_on_sigterm(error: Callable[[str], BaseException], quiet_exit: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM raises ``error("SIGTERM")`` in the main thread instead of killing the process, so
    that a stopped run unwinds (a checkpoint being written removes its temporary files) and says where it stands.
    torchrun sends SIGTERM to every surviving rank when one fails, as do job schedulers before their SIGKILL.

    ``quiet_exit`` (a process of a torchrun job): when the block ends with an error, SIGTERM stays ignored, so that
    torchrun's signal, which follows a rank's failure by milliseconds, does not kill the process before it has said
    why it stopped (torchrun's SIGKILL still bounds a hang). Otherwise the previous handler comes back in any case."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    raised = []

    def handler(signum, frame):
        if not raised:  # once: torchrun may signal a rank twice (the process and its group); SIGKILL follows anyway
            raised.append(signum)
            raise error(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if quiet_exit else previous)
        raise
    signal.signal(signal.SIGTERM, previous)


def lost_a_rank(err: BaseException) -> bool:
    """Whether ``err`` (raised by a collective) means another process of the group died or vanished."""
    if isinstance(err, dist.DistError):
        return True
    return any(s in str(err) for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def on_main_rank(env: Distributed, work: Callable[[], object]) -> None:
    """Run ``work`` on rank 0 while the other ranks wait; if it fails, every rank stops (rank 0 re-raises the
    error, the others raise a :class:`TrainingError` pointing at it)."""
    failed = torch.zeros(1, device=env.device)
    error = None
    if env.is_main:
        try:
            work()
        except Exception as err:  # re-raised below, after the other ranks have been told
            error, failed[0] = err, 1.0
    env.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise TrainingError("rank 0 failed while preparing the run (its error message says why)")


def wrap_model(model: nn.Module, env: Distributed, fsdp: bool) -> nn.Module:
    """The module the training step calls: DDP on several ranks (FSDP models are already sharded in place)."""
    if not env.active or fsdp:
        return model
    ids = [env.local_rank] if env.device.type == "cuda" else None
    # No buffer broadcast: buffers are identical on every rank by construction (gate biases move by the same
    # all-reduced update), and broadcasting would overwrite each rank's expert counts between micro-batches.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``bf16``, or ``auto`` on a CUDA GPU that supports it: bfloat16 autocast; otherwise none (fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def gathered_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model and optimizer state dicts with every sharded tensor gathered whole (all ranks take part)."""
    model_state = {k: full(v) for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for opt in opt_state["optimizers"]:
        opt["state"] = {pid: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                        for pid, entry in opt["state"].items()}
    return model_state, opt_state
