"""The Hugging Face side of the models: Auto-class registration and writing a model directory.

:func:`register_auto_classes` makes ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` resolve
``model_type="helm"`` (``import helmlm`` arranges for it to run). :func:`save_model_dir` writes what
``from_pretrained`` reads — ``config.json``, ``model.safetensors`` and the tokenizer — atomically: under a temporary
name, renamed into place when complete, never over an existing non-empty directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from helmlm.errors import ExportError
from helmlm.models.config import HELMConfig
from helmlm.models.modeling import HELMForCausalLM, HELMModel


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(HELMConfig.model_type, HELMConfig, exist_ok=True)
    AutoModel.register(HELMConfig, HELMModel, exist_ok=True)
    AutoModelForCausalLM.register(HELMConfig, HELMForCausalLM, exist_ok=True)


def check_new_dir(out: str | Path) -> Path:
    """``out`` if it is absent or an empty directory, else an :class:`ExportError` (nothing is ever overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose a new directory (nothing was written)")
    return out


def save_model_dir(model: HELMForCausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to the new directory ``out_dir``; return it. The tokenizer's
    ``model_max_length`` is set to the model's context (not transformers' "unlimited" 1e30), and every file gets the
    mode a plain ``open`` gives (``save_pretrained`` writes some through temporary files, created 0600)."""
    out = check_new_dir(out_dir)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(0o666 & ~umask)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
