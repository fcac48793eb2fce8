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
