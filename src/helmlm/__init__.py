"""helmlm: hyperbolic large language models (HELM-D, HELM-MiCE) with Euclidean twins.

The public API is re-exported here and imported lazily, so ``import helmlm`` (and the CLI's ``--help``) stay fast:

    from helmlm import HELMConfig, HELMForCausalLM, load_config, load_reference
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'helmlm' has no attribute {name!r}")
