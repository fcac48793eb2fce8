"""Training checkpoints: safetensors and JSON only (nothing is ever unpickled), written atomically.

A checkpoint is a directory ``<out_dir>/checkpoints/step-00000123/`` holding

- ``model.safetensors``: the model's state dict (parameters and buffers, e.g. MiCE gate biases);
- ``optimizer.safetensors``: every tensor of the optimizers' state (moments, step counters) and the RNG states;
- ``state.json``: step, data-stream position, the full training config, the tokenizer hash, the optimizers'
  non-tensor state (param groups, scalar entries) and the last metrics; written last.

It is built under a temporary name, every file is fsynced, and only then renamed into place; ``latest`` (a one-line
file naming the newest checkpoint) is replaced atomically afterwards. A crash at any point leaves either the
previous ``latest`` or the new one, both complete; leftover temporary directories are ignored and removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from helmlm.training.fsdp import like

STATE_FILE = "state.json"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a :class:`HybridOptimizer` state dict into tensors (keyed ``opt{i}.{param}.{name}``) and JSON."""
    tensors, meta = {}, {"optimizers": []}
    for i, opt in enumerate(state["optimizers"]):
        scalars = {}
        for pid, entry in opt["state"].items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"opt{i}.{pid}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[name] = value
        meta["optimizers"].append({"param_groups": opt["param_groups"], "scalars": scalars,
                                   "params": sorted(int(p) for p in opt["state"])})
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    optimizers = []
    for i, opt in enumerate(meta["optimizers"]):
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            prefix, pid, name = key.split(".", 2)
            if prefix == f"opt{i}":
                state.setdefault(int(pid), {})[name] = value
        for pid, entry in opt["scalars"].items():
            state.setdefault(int(pid), {}).update(entry)
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in opt["param_groups"]]
        optimizers.append({"state": state, "param_groups": groups})
    return {"optimizers": optimizers}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` (full, unsharded state dicts) atomically, point ``latest`` at it, and delete all
    but the newest ``keep_last``."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model_tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    save_file(model_tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    opt_tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        opt_tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a rerun of the same step (after a resume from an older checkpoint)
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the highest ``step-*`` with a state file."""
    root = checkpoint_root(out_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from ``path``; return its ``state.json``."""
    path = Path(path)
    state = read_checkpoint_state(path)
    current = model.state_dict()
    weights = {k: like(v, current[k]) if k in current else v for k, v in load_file(path / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit this model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); was it written for another model config?")
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    # torch's Adam.__setstate__ (run by load_state_dict) turns an int ``step`` into a float32 tensor; geoopt's
    # Riemannian Adam keeps it an int and computes its bias corrections in double precision from it. Put the
    # saved Python scalars back so a resumed run computes exactly what the uninterrupted one does.
    for opt, meta in zip(optimizer.optimizers, state["optimizer"]["optimizers"]):
        params = [p for group in opt.param_groups for p in group["params"]]
        for pid, entry in meta["scalars"].items():
            opt.state[params[int(pid)]].update(entry)
        for p in params:  # FSDP: moments saved whole are sharded like their parameter
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    opt.state[p][k] = like(v, p)
    return state
