"""Training checkpoints: safetensors and JSON only (nothing is ever unpickled), written atomically.

A checkpoint is a directory ``<out_dir>/checkpoints/step-00000123/`` holding

- ``model.safetensors``: the model's state dict (parameters and buffers, e.g. MiCE gate biases);
- ``optimizer.safetensors``: every tensor of the optimizers' state (moments, step counters) and the RNG states;
- ``state.json``: step, data-stream position, the full training config, the resolved model config, the tokenizer
  hash, the optimizers' non-tensor state (param groups, scalar entries), the last metrics, and the size and sha256
  of each safetensors file (the checkpoint's manifest); written last.

It is built under a temporary name, every file is fsynced, and only then renamed into place; ``latest`` (a one-line
file naming the newest checkpoint) is replaced atomically afterwards. A crash at any point leaves either the
previous ``latest`` or the new one, both complete; leftover temporary directories are ignored and removed.

Damage after the fact (a full disk, a copy cut short, bit rot) is caught by :func:`verify_checkpoint`, which checks
every file against the manifest before anything is loaded; :func:`find_checkpoint` then falls back to the newest
intact checkpoint and says which one it skipped and why. Hashing costs one extra read of each file, which is
small next to writing it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from helmlm.errors import CheckpointError  # noqa: F401  (re-exported)
from helmlm.storage import check_free_space, disk_errors, file_sha256
from helmlm.training.distributed import like

STATE_FILE = "state.json"
WEIGHT_FILES = ("model.safetensors", "optimizer.safetensors")


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
    but the newest ``keep_last``.

    A checkpoint that cannot fit is refused before a byte is written; a disk fault midway (full, read-only, denied)
    removes the partial temporary directory. Either way a :class:`~helmlm.errors.StorageError` names the newest
    intact checkpoint and how to continue, and the checkpoints already written are untouched."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    model_tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    opt_tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        opt_tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # tensor bytes, plus the safetensors headers and state.json (a generous allowance for both)
    needed = sum(t.nbytes for t in (*model_tensors.values(), *opt_tensors.values())) + (1 << 20)
    what, then = f"checkpoint step {step}", _how_to_continue(out_dir)
    check_free_space(out_dir, needed, what, then)
    try:
        with disk_errors(what, root, needed, then):
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            save_file(model_tensors, tmp / "model.safetensors", metadata={"format": "pt"})
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                     for name in WEIGHT_FILES}
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer": opt_meta, "files": files},
                                                     indent=1) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a rerun of the same step (after a resume from an older checkpoint)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _point_latest_at(root, final)
    finally:  # nothing half-written stays behind, whatever stopped the write (a fault, Ctrl-C, SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _point_latest_at(root: Path, checkpoint: Path) -> None:
    latest_tmp = root / f".latest.tmp-{os.getpid()}"
    try:
        latest_tmp.write_text(checkpoint.name + "\n")
        os.replace(latest_tmp, root / "latest")
    finally:
        latest_tmp.unlink(missing_ok=True)
    _fsync_dir(root)


def _how_to_continue(out_dir: str | Path) -> str:
    """After a failed write: which checkpoint survives, and how to go on from it."""
    newest = latest_checkpoint(out_dir)
    if newest is None:
        return "no checkpoint of this run was written yet, so start it again (without --resume)"
    return (f"the checkpoints already written are intact, the newest is {newest}; continue from it with the same "
            "command and --resume")


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint that finished writing: the one ``latest`` names, else the highest ``step-*`` with a
    state file. Its files are not verified: :func:`find_checkpoint` does that."""
    candidates = checkpoint_candidates(out_dir)
    return candidates[0] if candidates else None


def checkpoint_candidates(out_dir: str | Path) -> list[Path]:
    """Checkpoints with a state file, newest first (the one ``latest`` names leads)."""
    root = checkpoint_root(out_dir)
    found = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).is_file()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def update_checkpoint_state(path: str | Path, **changes: Any) -> None:
    """Replace entries of checkpoint ``path``'s ``state.json`` (atomically: a temporary file, then a rename) and point
    ``latest`` at it; its weight files, and so its manifest, stay as they are."""
    path = Path(path)
    state = read_checkpoint_state(path)
    tmp = path / f".{STATE_FILE}.tmp-{os.getpid()}"
    with disk_errors(f"the state of checkpoint {path.name}", path, then=_how_to_continue(path.parent.parent)):
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps({**state, **changes}, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path / STATE_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path)
        _point_latest_at(path.parent, path)


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    path = Path(path) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a checkpoint (no {STATE_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {err})") from None
    if not isinstance(state, dict) or not {"step", "config", "optimizer"} <= set(state):
        raise CheckpointError(f"{path} is damaged (step, config or optimizer state missing)")
    return state


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of checkpoint ``path`` against its manifest (size, then sha256); return its state.
    Raises :class:`CheckpointError` naming the damaged file. Checkpoints written before manifests existed are only
    checked for their files' presence."""
    path = Path(path)
    state = read_checkpoint_state(path)
    for name in WEIGHT_FILES:
        file = path / name
        expected = state.get("files", {}).get(name)
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if expected is None:
            continue
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} is damaged: {size:,} bytes, the manifest says {expected['bytes']:,} "
                                  "(truncated?)")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} is damaged: its sha256 differs from the manifest's")
    return state


def find_checkpoint(path: str | Path, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to use for ``path`` and its verified state.

    ``path`` is a checkpoint directory (used if intact, else an error) or a run directory: its newest intact
    checkpoint, after telling ``log`` about each damaged newer one that was skipped."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path, verify_checkpoint(path)
    candidates = checkpoint_candidates(path)
    if not candidates:
        missing = "" if path.exists() else " (it does not exist)"
        raise CheckpointError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run directory with "
                              f"checkpoints{missing}")
    damaged = []
    for candidate in candidates:
        try:
            state = verify_checkpoint(candidate)
        except CheckpointError as err:
            damaged.append(str(err))
            log(f"warning: skipping checkpoint {candidate.name}: {err}")
            continue
        if damaged:
            log(f"warning: using {candidate} (step {state['step']}), the newest intact checkpoint")
        return candidate, state
    raise CheckpointError(f"every checkpoint in {checkpoint_root(path)} is damaged: " + "; ".join(damaged))


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a damaged file reported as a :class:`CheckpointError`."""
    try:
        return load_file(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a torn file
        raise CheckpointError(f"{file} is damaged and cannot be read ({err})") from None


def restore_optimizer_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Set the RNG states saved in checkpoint ``path`` and return its optimizer state dict (``{"optimizers": [...]}``,
    one per optimizer saved); ``state`` is the checkpoint's ``state.json``."""
    tensors = read_tensors(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return _unflatten_optimizer(tensors, state["optimizer"])


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from ``path``; return its ``state.json``."""
    path = Path(path)
    state = read_checkpoint_state(path)
    current = model.state_dict()
    saved = read_tensors(path / "model.safetensors")
    weights = {k: like(v, current[k]) if k in current else v for k, v in saved.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); was it written for another model config?")
    optimizer.load_state_dict(restore_optimizer_state(path, state))
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


def checkpoint_model_config(state: dict[str, Any]):
    """The :class:`~helmlm.models.HELMConfig` a checkpoint was trained with: the resolved one it records (the
    vocabulary sized to the tokenizer, say), else the one its training config describes (older checkpoints)."""
    from helmlm.config import train_config_from_dict
    from helmlm.models import HELMConfig

    if "model_config" in state:
        return HELMConfig.from_dict(state["model_config"])
    return train_config_from_dict(state["config"]).model_config()

