"""The model card (``README.md``) that ``helmlm export`` writes into a model directory.

Its YAML header is the Hub's metadata (through ``huggingface_hub.ModelCardData``): ``library_name``,
``pipeline_tag``, ``tags``, ``license``, ``datasets`` (for a Hub corpus) and helmlm's own numbers (parameters,
tokens). The text says what the model is, how it was trained (data, tokens, steps, the run's validation loss and
perplexity) and how to load it with and without helmlm.
"""

from __future__ import annotations

import math
from typing import Any

ARCHITECTURES = {
    ("lorentz", "mha", "dense"): ("HELM-D", "a hyperbolic decoder in the Lorentz model: Lorentz token embeddings, "
                                  "Lorentz self-attention with hyperbolic rotary positions (HoPE), hyperbolic RMSNorm, "
                                  "Lorentzian residual connections and a hyperbolic SwiGLU feed-forward network "
                                  "(HELM, arXiv 2505.24722)"),
    ("lorentz", "mla", "moe"): ("HELM-MiCE", "a hyperbolic decoder in the Lorentz model with hyperbolic multi-head "
                                "latent attention (HMLA, a compressed latent KV cache) and a mixture of curvature "
                                "experts (MiCE: each expert in its own hyperbolic space), hyperbolic RMSNorm and "
                                "Lorentzian residual connections (HELM, arXiv 2505.24722)"),
    ("euclidean", "mha", "dense"): ("LLaMA-style twin", "the Euclidean twin of HELM-D: RoPE attention, RMSNorm and a "
                                    "SwiGLU feed-forward network, the same widths and training recipe"),
    ("euclidean", "mla", "moe"): ("DeepSeek-style twin", "the Euclidean twin of HELM-MiCE: multi-head latent attention "
                                  "and a routed mixture of experts, the same widths and training recipe"),
}


def describe(config) -> tuple[str, str]:
    """``(name, one-sentence description)`` of a :class:`~helmlm.models.HELMConfig`'s architecture."""
    key = (config.geometry, config.attention, config.ffn)
    if key in ARCHITECTURES and not getattr(config, "swapped_components", None):
        return ARCHITECTURES[key]
    return (f"{config.geometry} {config.attention}/{config.ffn} decoder",
            f"a decoder with {config.geometry} geometry, {config.attention} attention and a {config.ffn} "
            f"feed-forward network" + (f" (components swapped to the other geometry: "
                                       f"{', '.join(config.swapped_components)})"
                                       if getattr(config, "swapped_components", None) else ""))


def _training_data(data: dict[str, Any]) -> tuple[str, list[str]]:
    """What the run trained on, in words, and the Hub datasets it names."""
    if data.get("source") == "hf":
        name = data.get("hf_name")
        subset = f" ({data['hf_config']})" if data.get("hf_config") else ""
        return f"the Hugging Face dataset `{name}`{subset}, split `{data.get('hf_split', 'train')}`", [name]
    if data.get("source") == "builtin":
        return "helmlm's built-in offline corpus (public-domain and permissively licensed text that packages ship)", []
    paths = data.get("paths") or []
    names = ", ".join(str(p).rsplit("/", 1)[-1] for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"local files ({names})", []


def model_card(name: str, state: dict[str, Any], model_config, params: dict[str, int], kind: str,
               license: str = "apache-2.0") -> str:
    """The ``README.md`` for a model exported from a checkpoint whose ``state.json`` is ``state``; ``kind`` is the
    directory's format (``helm`` or ``llama``)."""
    from huggingface_hub import ModelCard, ModelCardData

    arch, description = describe(model_config)
    train, data = state["config"]["train"], state["config"]["data"]
    data_text, datasets = _training_data(data)
    metrics = state.get("metrics", {})
    tags = ["helmlm", "helm"] + (["hyperbolic", "lorentz"] if model_config.geometry == "lorentz" else ["euclidean"])
    tags += ["mixture-of-experts"] if model_config.ffn == "moe" else []
    tags += ["custom_code"] if kind == "helm" else ["llama"]
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", license=license,
                              tags=tags, datasets=datasets or None, parameters_total=params["total"],
                              parameters_active=params["active"], training_tokens=state.get("tokens_seen"))
    loss = metrics.get("val_loss")
    result = (f"validation loss **{loss:.4f}** (perplexity {math.exp(loss):.2f}) at step {state['step']}, on the "
              "run's held-out split" if loss is not None else "no validation loss was recorded for this run")
    load = _loading(name, kind)
    shape = f"{model_config.num_hidden_layers}, {model_config.hidden_size}, {model_config.num_attention_heads}"
    body = f"""
# {name}

{arch}: {description}.

| | |
|---|---|
| parameters | {params['total']:,} total, {params['active']:,} active per token |
| layers, width, heads | {shape} |
| vocabulary, context | {model_config.vocab_size:,} tokens, {model_config.max_position_embeddings:,} positions |

## Training

Trained with helmlm on {data_text}: {state.get('tokens_seen', 0):,} tokens in {state['step']:,}
optimizer steps (sequences of {train.get('seq_len')}, learning rate {train.get('lr')}, seed {train.get('seed')}).
Result: {result}.

## Use

{load}
"""
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


def _loading(name: str, kind: str) -> str:
    if kind == "llama":
        return f"""A standard `LlamaForCausalLM`: any transformers loads it, no helmlm needed.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```"""
    return f"""Without helmlm, with torch and transformers alone (the directory carries its model code, generated
from helmlm's sources):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```

With helmlm installed (`pip install helmlm`), `import helmlm` registers the classes and no remote code runs:

```python
import helmlm  # noqa: F401
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{name}")
```

Or from the command line: `helmlm generate {name} "Once upon a time"`."""
