"""helmlm: hyperbolic large language models (HELM-D, HELM-MiCE) with Euclidean twins.

    from helmlm import HELMConfig, HELMForCausalLM, load_config, load_reference

``import helmlm`` registers the HELM classes with transformers' ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM``, so that ``AutoModelForCausalLM.from_pretrained(path)`` works on a saved HELM directory.
The registration needs torch and transformers (seconds to import), which ``import helmlm`` alone does not pay: if
transformers is already imported, it happens now; otherwise it happens the moment transformers finishes importing
(a one-shot import hook, :class:`_RegisterWithTransformers`). Either way it is done before any Auto class can be
used, and ``helmlm --help`` starts without loading either library. The names below load on first access.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HELMConfig": "helmlm.models",
    "HELMForCausalLM": "helmlm.models",
    "load_config": "helmlm.models",
    "available_presets": "helmlm.models",
    "ConfigError": "helmlm.errors",
    "InputError": "helmlm.errors",
    "HelmlmError": "helmlm.errors",
    "load_reference": "helmlm.compat",
    "ReferenceCompatError": "helmlm.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'helmlm' has no attribute {name!r}")


class _RegisterWithTransformers(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``transformers`` with the regular finders, runs its module as usual, then imports
    :mod:`helmlm.models` (whose import registers the Auto classes), and removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        importlib.import_module("helmlm.models")


if "transformers" in sys.modules:
    importlib.import_module("helmlm.models")
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
