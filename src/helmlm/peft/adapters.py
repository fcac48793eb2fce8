"""Saved adapters: which kind a directory holds, reloading it onto its base model, and the optimizer's no-decay set."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from helmlm.errors import AdapterError
from helmlm.peft.layer import HypLoraConfig

ADAPTER_CONFIG = "adapter_config.json"
NO_DECAY_NAMES = ("lora_curvature", "lora_input_scale")


def _adapter_config(path: str | Path) -> dict:
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(f"{path} holds no {ADAPTER_CONFIG}: not a PEFT adapter directory (save one with "
                           "model.save_pretrained(DIR) on a PeftModel, or with helmlm finetune)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{file} is not a LoRA or HypLoRA adapter (peft_type {config.get('peft_type')!r})")
    return config


def is_hyplora_dir(path: str | Path) -> bool:
    """Whether the adapter saved in ``path`` is a HypLoRA adapter (else a plain LoRA one)."""
    return bool(_adapter_config(path).get("hyplora", False))


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False):
    """``PeftModel.from_pretrained`` with the right config class: a HypLoRA adapter comes back as HypLoRA (stock
    PEFT would read its ``LORA`` config as a plain LoRA). Weights are read from safetensors only."""
    from peft import LoraConfig, PeftModel

    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{path} has no adapter_model.safetensors (helmlm reads adapter weights from safetensors "
                           "only, never pickled .bin files)")
    config = (HypLoraConfig if is_hyplora_dir(path) else LoraConfig).from_pretrained(str(path))
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, config=config,
                                     is_trainable=is_trainable, use_safetensors=True)


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters to keep out of weight decay: HypLoRA's curvatures and input scales (scalars whose
    decay would pull K and log rho towards 0)."""
    return {name for name, _ in model.named_parameters() if any(n in name for n in NO_DECAY_NAMES)}


def load_base_model(path: str | Path, dtype: str = "float32"):
    """``(model, tokenizer)`` of a Hugging Face causal-LM directory whose weights are safetensors; a GGUF file, a
    pickled checkpoint or a training run gets an error that says what to do instead."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        raise AdapterError(f"{path} is a GGUF file; convert it to a model directory first: helmlm convert {path} OUT")
    if not path.is_dir():
        raise AdapterError(f"base model directory not found: {path}")
    if (path / "checkpoints").is_dir():
        raise AdapterError(f"{path} is a helmlm training run; export it first: helmlm export {path} OUT")
    if not (path / "config.json").is_file():
        raise AdapterError(f"{path} is not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".gguf"))
        hint = (f" (found {', '.join(found)}: pickled or GGUF weights, which helmlm does not read; re-save the model "
                "with save_pretrained(DIR, safe_serialization=True), or `helmlm convert` a GGUF)") if found else ""
        raise AdapterError(f"{path} holds no .safetensors weights{hint}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise AdapterError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=getattr(torch, dtype))
    return model, tokenizer
