"""HELM models: configuration and the causal language model.

Importing this package registers ``HELMConfig`` (``model_type="helm"``), ``HELMModel`` and ``HELMForCausalLM`` with
transformers' ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``, so a saved directory loads with
``AutoModelForCausalLM.from_pretrained(path)`` once ``helmlm`` is imported.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from helmlm.models.config import ConfigError, HELMConfig, available_presets, load_config
from helmlm.models.modeling import HELMForCausalLM, HELMModel, InputError, causal_lm_loss, output_cache

AutoConfig.register(HELMConfig.model_type, HELMConfig, exist_ok=True)
AutoModel.register(HELMConfig, HELMModel, exist_ok=True)
AutoModelForCausalLM.register(HELMConfig, HELMForCausalLM, exist_ok=True)

__all__ = ["ConfigError", "HELMConfig", "available_presets", "load_config", "HELMForCausalLM", "HELMModel", "output_cache",
           "InputError", "causal_lm_loss"]
