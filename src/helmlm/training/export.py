"""``helmlm export CHECKPOINT OUT_DIR``: a training checkpoint -> a Hugging Face model directory.

The directory holds ``config.json`` + ``model.safetensors`` (``save_pretrained``) and the tokenizer the model was
trained with, so ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``
work after ``import helmlm``. It is written under a temporary name and renamed when complete; an existing,
non-empty ``OUT_DIR`` is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from helmlm.errors import ExportError  # noqa: F401  (re-exported)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (``.../step-XXXXXXXX``, verified), or a run directory (its newest intact checkpoint;
    damaged newer ones are reported on stderr)."""
    from helmlm.training.checkpoint import CheckpointError, find_checkpoint

    try:
        return find_checkpoint(path, log=lambda msg: print(msg, file=sys.stderr, flush=True))[0]
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write the model of ``checkpoint`` and its tokenizer (``tokenizer``, default: the one in the run's data
    directory, checked against the hash recorded in the checkpoint) to ``out_dir``; return ``out_dir``."""
    from helmlm.config import train_config_from_dict
    from helmlm.data.tokenizer import load_tokenizer, tokenizer_hash
    from helmlm.models import HELMForCausalLM
    from helmlm.training.checkpoint import checkpoint_model_config, read_checkpoint_state, read_tensors

    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose a new directory (nothing was written)")
    state = read_checkpoint_state(ckpt)
    config = train_config_from_dict(state["config"])
    tok_path = Path(tokenizer) if tokenizer is not None else Path(config.data.dir) / "tokenizer"
    if tokenizer is None and not tok_path.is_dir():
        raise ExportError(f"the run's tokenizer is not at {tok_path} (its data directory moved?); pass "
                          "--tokenizer DIR")
    tok = load_tokenizer(tok_path)
    if tokenizer is None and tokenizer_hash(tok) != state.get("tokenizer_sha256"):
        raise ExportError(f"the tokenizer at {tok_path} is not the one this checkpoint was trained with (hash "
                          "differs); pass the right one with --tokenizer DIR")

    model_config = checkpoint_model_config(state)
    model_config.eos_token_id = model_config.pad_token_id = tok.eos_token_id
    tok.model_max_length = model_config.max_position_embeddings  # not transformers' "unlimited" 1e30
    model = HELMForCausalLM(model_config)
    missing, unexpected = model.load_state_dict(read_tensors(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ExportError(f"{ckpt}/model.safetensors does not fit its own config (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _readable_by_all(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readable_by_all(directory: Path) -> None:
    """Give every file the mode a plain ``open`` would (0644 under the usual umask): ``save_pretrained`` writes
    some through temporary files, which are created 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)
