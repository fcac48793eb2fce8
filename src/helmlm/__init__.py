"""helmlm: hyperbolic large language models (HELM-D, HELM-MiCE) with Euclidean twins.

    from helmlm import HELMConfig, HELMForCausalLM, load_config, load_reference

``import helmlm`` registers the HELM classes with transformers' ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` (by importing :mod:`helmlm.models`), so that ``AutoModelForCausalLM.from_pretrained(path)``
works on a saved HELM directory. That costs the torch + transformers import (seconds), which every use of a model
pays anyway; transformers offers no lazy registration hook that would avoid it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HELMConfig": "helmlm.models",
    "HELMForCausalLM": "helmlm.models",
    "load_config": "helmlm.models",
    "available_presets": "helmlm.models",
    "ConfigError": "helmlm.models",
    "InputError": "helmlm.models",
    "load_reference": "helmlm.compat",
    "ReferenceCompatError": "helmlm.compat",
}

__all__ = ["__version__", *_EXPORTS]

import helmlm.models  # noqa: E402,F401  (registers the Auto classes)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'helmlm' has no attribute {name!r}")
