"""The remote code of a helmlm model directory (``helmlm export`` copies this file there as ``modeling_helm.py``).

``config.json``'s ``auto_map`` names this module, so ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` (and ``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``) load the
model in an interpreter that never imported helmlm. The module defines no class of its own: it re-exposes the
installed helmlm's classes, so a directory loads as the same classes whether or not ``import helmlm`` ran first (when
it did, transformers uses the registered classes and never imports this file). helmlm has to be installed.
"""

try:  # transformers' check of a remote module's imports skips try blocks: the message below is ours
    from helmlm.models import HELMConfig, HELMForCausalLM, HELMModel
except ModuleNotFoundError as err:
    if err.name != "helmlm":
        raise  # helmlm is installed but one of its own dependencies is missing: that message is the right one
    raise ImportError(
        "this model directory holds a helmlm model (model_type 'helm': hyperbolic HELM or its Euclidean twin), "
        "whose classes come from the helmlm package, and helmlm is not installed in this Python environment. "
        "Install it with `pip install helmlm` (or `pip install -e .` in a checkout of the helmlm repository), "
        "then load the directory again"
    ) from None

__all__ = ["HELMConfig", "HELMForCausalLM", "HELMModel"]
