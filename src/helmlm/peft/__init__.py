"""HypLoRA: hyperbolic low-rank adapters for any Hugging Face causal LM (issue 14; MATH.md section 7).

- :func:`hyplora_delta`: the adapter's function, pure (``helmlm.peft.functional``).
- :class:`HypLoraConfig`: ``peft.get_peft_model(model, HypLoraConfig(...))`` (``helmlm.peft.layer``).
- :func:`load_adapter`: reload a saved LoRA or HypLoRA adapter onto its base model.

Needs the ``peft`` extra (``pip install 'helmlm[peft]'``).
"""

from helmlm.errors import AdapterError, HypLoraMergeError
from helmlm.peft.functional import VARIANTS, adapter_shapes, hyplora_delta
from helmlm.peft.layer import HypLoraConfig, HypLoraLinear, HypLoraVariant
from helmlm.peft.adapters import is_hyplora_dir, load_adapter, load_base_model, no_decay_parameter_names

__all__ = ["VARIANTS", "AdapterError", "HypLoraConfig", "HypLoraLinear", "HypLoraMergeError", "HypLoraVariant",
           "adapter_shapes", "hyplora_delta", "is_hyplora_dir", "load_adapter", "load_base_model",
           "no_decay_parameter_names"]
