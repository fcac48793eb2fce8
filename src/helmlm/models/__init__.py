"""HELM models: configuration and the causal language model.

Importing this package registers ``HELMConfig`` (``model_type="helm"``), ``HELMModel`` and ``HELMForCausalLM`` with
transformers' ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` (:mod:`helmlm.models.hf`), so a saved
directory loads with ``AutoModelForCausalLM.from_pretrained(path)`` once ``helmlm`` is imported.
"""

from helmlm.errors import ConfigError, InputError
from helmlm.models.config import HELMConfig, available_presets, load_config
from helmlm.models.hf import register_auto_classes
from helmlm.models.modeling import HELMForCausalLM, HELMModel, causal_lm_loss, output_cache

register_auto_classes()

__all__ = ["ConfigError", "HELMConfig", "available_presets", "load_config", "HELMForCausalLM", "HELMModel",
           "InputError", "causal_lm_loss", "output_cache"]
