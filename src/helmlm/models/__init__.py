"""HELM models: configuration and the causal language model."""

from helmlm.models.config import ConfigError, HELMConfig
from helmlm.models.modeling import HELMForCausalLM, HELMModel, InputError, causal_lm_loss

__all__ = ["ConfigError", "HELMConfig", "HELMForCausalLM", "HELMModel", "InputError", "causal_lm_loss"]
