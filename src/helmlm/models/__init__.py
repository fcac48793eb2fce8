"""HELM models: configuration and the causal language model."""

from helmlm.models.config import ConfigError, HELMConfig, available_presets, load_config
from helmlm.models.modeling import HELMForCausalLM, HELMModel, InputError, causal_lm_loss

__all__ = ["ConfigError", "HELMConfig", "available_presets", "load_config", "HELMForCausalLM", "HELMModel", "InputError", "causal_lm_loss"]
