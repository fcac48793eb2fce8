"""The Hugging Face side of the models: Auto-class registration, writing a model directory, the Llama conversion.

:func:`register_auto_classes` makes ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` resolve
``model_type="helm"`` (``import helmlm`` arranges for it to run). :func:`save_model_dir` writes what
``from_pretrained`` reads — ``config.json``, ``model.safetensors`` and the tokenizer — atomically: under a temporary
name, renamed into place when complete, never over an existing non-empty directory. A directory loads anywhere:

- ``format="helm"``: the HELM classes, plus remote code generated from helmlm's own sources
  (:mod:`helmlm.models.remote_code`: ``modeling_helm.py``, named by ``auto_map``, and the ``helmlm_*.py`` files it
  imports), so ``from_pretrained(DIR, trust_remote_code=True)`` works with torch and transformers alone;
- ``format="llama"``: a standard ``LlamaForCausalLM`` (:func:`to_llama`) that any transformers loads, no helmlm
  needed. Only the LLaMA-style twin has that architecture (:func:`llama_mismatch`); ``format="auto"`` picks it
  where it fits and HELM elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from helmlm.errors import ExportError
from helmlm.models.config import HELMConfig
from helmlm.models.modeling import HELMForCausalLM, HELMModel
from helmlm.storage import check_free_space, disk_errors, exclusive

FORMATS = ("auto", "helm", "llama")
REMOTE_MODULE = "modeling_helm"  # the name of remote_code.py inside a model directory
AUTO_MAP = {"AutoConfig": f"{REMOTE_MODULE}.HELMConfig", "AutoModel": f"{REMOTE_MODULE}.HELMModel",
            "AutoModelForCausalLM": f"{REMOTE_MODULE}.HELMForCausalLM"}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # absent from a config unless set


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(HELMConfig.model_type, HELMConfig, exist_ok=True)
    AutoModel.register(HELMConfig, HELMModel, exist_ok=True)
    AutoModelForCausalLM.register(HELMConfig, HELMForCausalLM, exist_ok=True)


def check_new_dir(out: str | Path) -> Path:
    """``out`` if it is absent or an empty directory, else an :class:`ExportError` (nothing is ever overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose a new directory (nothing was written)")
    return out


# ------------------------------------------------------------------------------------------- the Llama format


def llama_mismatch(config: HELMConfig) -> str | None:
    """Why a model of ``config`` is not a ``LlamaForCausalLM`` (``None`` when it is one: the Euclidean twin with
    multi-head attention and a dense SwiGLU FFN)."""
    if config.geometry != "euclidean":
        return f"geometry={config.geometry!r} (Lorentz layers have no Llama counterpart)"
    if config.attention != "mha":
        return f"attention={config.attention!r} (latent attention is not Llama's)"
    if config.ffn != "dense":
        return f"ffn={config.ffn!r} (routed experts are not Llama's)"
    return None


def resolve_format(config: HELMConfig, format: str = "auto") -> str:
    """``"helm"`` or ``"llama"`` for ``format`` (one of :data:`FORMATS`); ``auto`` is ``llama`` where the
    architecture is Llama's."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    reason = llama_mismatch(config)
    if format == "llama" and reason is not None:
        raise ExportError(f"this model cannot be written as a LlamaForCausalLM: {reason}; use the format 'helm' "
                          "(or 'auto')")
    return format if format != "auto" else ("helm" if reason else "llama")


def _rotary_permutation(head_dim: int) -> torch.Tensor:
    """Rows of a query/key head in Llama's order: helmlm rotates adjacent pairs ``(2i, 2i+1)``, Llama the halves
    ``(i, i + d/2)``; the same permutation of queries and keys leaves every score unchanged."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(weight: torch.Tensor, heads: int, perm: torch.Tensor) -> torch.Tensor:
    return weight.unflatten(0, (heads, -1))[:, perm].flatten(0, 1)


def llama_config(config: HELMConfig, dtype: torch.dtype | None = None, tied: bool = False):
    """The ``LlamaConfig`` of the Euclidean twin ``config`` (same widths, RMSNorm eps, rotary base, token ids)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=tied, dtype=dtype,
        **{name: getattr(config, name, None) for name in TOKEN_IDS})


def to_llama(model: HELMForCausalLM):
    """The LLaMA-style twin ``model`` as a transformers ``LlamaForCausalLM`` with the same weights and logits.

    Mapping: ``embed`` -> ``embed_tokens``; ``attn_norm`` / ``ffn_norm`` -> ``input_layernorm`` /
    ``post_attention_layernorm``; the fused ``qkv`` -> ``q_proj`` / ``k_proj`` / ``v_proj``, query and key rows
    reordered per head from interleaved rotary pairs to Llama's half split (:func:`_rotary_permutation`); ``out``
    -> ``o_proj``; SwiGLU ``w1`` / ``w3`` / ``w2`` -> ``gate_proj`` / ``up_proj`` / ``down_proj``. Llama computes its
    RMSNorm and rotary angles in fp32 even for fp64 inputs, so logits agree to fp32 rounding, not bit for bit."""
    from transformers import LlamaForCausalLM

    reason = llama_mismatch(model.config)
    if reason is not None:
        raise ExportError(f"this model cannot be converted to a LlamaForCausalLM: {reason}")
    cfg, base = model.config, model.model
    tied = model.lm_head.weight is base.embed.weight
    llama = LlamaForCausalLM(llama_config(cfg, model.dtype, tied)).to(model.dtype)
    perm, heads, dim = _rotary_permutation(cfg.head_dim), cfg.num_attention_heads, cfg.hidden_size
    state = {"model.embed_tokens.weight": base.embed.weight, "model.norm.weight": base.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(base.layers):
        q, k, v = layer.attn.qkv.weight.split(dim)
        prefix = f"model.layers.{i}."
        state.update({
            prefix + "input_layernorm.weight": layer.attn_norm.weight,
            prefix + "self_attn.q_proj.weight": _permute_heads(q, heads, perm),
            prefix + "self_attn.k_proj.weight": _permute_heads(k, heads, perm),
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.o_proj.weight": layer.attn.out.weight,
            prefix + "post_attention_layernorm.weight": layer.ffn_norm.weight,
            prefix + "mlp.gate_proj.weight": layer.ffn.w1.weight,
            prefix + "mlp.up_proj.weight": layer.ffn.w3.weight,
            prefix + "mlp.down_proj.weight": layer.ffn.w2.weight,
        })
    with torch.no_grad():
        llama.load_state_dict({k: t.detach().clone() for k, t in state.items()}, strict=True)
    return llama.train(model.training)


def from_llama(llama) -> HELMForCausalLM:
    """The inverse of :func:`to_llama`: a ``LlamaForCausalLM`` of the architecture helmlm writes (no biases, as many
    key/value heads as heads, ``head_dim = hidden_size / heads``, SiLU, default rotary) as the LLaMA-style twin."""
    c = llama.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    checks = {"attention_bias": (getattr(c, "attention_bias", False), False),
              "mlp_bias": (getattr(c, "mlp_bias", False), False), "hidden_act": (c.hidden_act, "silu"),
              "num_key_value_heads": (c.num_key_value_heads, c.num_attention_heads),
              "head_dim": (getattr(c, "head_dim", None), c.hidden_size // c.num_attention_heads),
              "rope_type": (rope.get("rope_type", "default"), "default")}
    bad = [f"{k}={got!r} (needs {want!r})" for k, (got, want) in checks.items() if got != want]
    if bad:
        raise ExportError("this Llama model has no helmlm twin: " + ", ".join(bad))
    config = HELMConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, geometry="euclidean", attention="mha", ffn="dense",
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))), rms_norm_eps=c.rms_norm_eps,
        initializer_range=c.initializer_range,
        **{name: getattr(c, name) for name in TOKEN_IDS if getattr(c, name, None) is not None})
    model = HELMForCausalLM(config).to(llama.dtype)
    inverse = torch.argsort(_rotary_permutation(config.head_dim))
    src = {k: t.detach() for k, t in llama.state_dict().items()}
    state = {"model.embed.weight": src["model.embed_tokens.weight"], "model.norm.weight": src["model.norm.weight"],
             "lm_head.weight": src.get("lm_head.weight", src["model.embed_tokens.weight"])}
    heads = config.num_attention_heads
    for i in range(config.num_hidden_layers):
        p = q = f"model.layers.{i}."
        state[q + "attn.qkv.weight"] = torch.cat([_permute_heads(src[p + "self_attn.q_proj.weight"], heads, inverse),
                                                  _permute_heads(src[p + "self_attn.k_proj.weight"], heads, inverse),
                                                  src[p + "self_attn.v_proj.weight"]])
        for ours, theirs in (("attn_norm", "input_layernorm"), ("attn.out", "self_attn.o_proj"),
                             ("ffn_norm", "post_attention_layernorm"), ("ffn.w1", "mlp.gate_proj"),
                             ("ffn.w3", "mlp.up_proj"), ("ffn.w2", "mlp.down_proj")):
            state[q + ours + ".weight"] = src[p + theirs + ".weight"]
    with torch.no_grad():
        model.load_state_dict({k: t.clone() for k, t in state.items()}, strict=True)
    return model.train(llama.training)


# ------------------------------------------------------------------------------------------ the model directory


@contextlib.contextmanager
def _without_code_copies(*objects):
    """A remote-code load (``trust_remote_code=True`` before ``import helmlm``) marks helmlm's classes as custom
    code, after which ``save_pretrained`` would copy ``config.py`` / ``modeling.py`` into the directory and point
    ``auto_map`` at the copies; the directory names :mod:`helmlm.models.remote_code` instead."""
    saved = [(cls, cls.__dict__["_auto_class"]) for cls in {type(o) for o in objects} if "_auto_class" in cls.__dict__]
    for cls, _ in saved:
        cls._auto_class = None
    try:
        yield
    finally:
        for cls, value in saved:
            cls._auto_class = value


def write_remote_code(model_dir: str | Path) -> None:
    """Write the remote code generated from this helmlm's sources (:mod:`helmlm.models.remote_code`:
    ``modeling_helm.py`` and the ``helmlm_*.py`` files it imports) into ``model_dir`` and name it in
    ``config.json``'s ``auto_map``, so ``from_pretrained(model_dir, trust_remote_code=True)`` needs neither helmlm
    nor geoopt."""
    from helmlm.models.remote_code import remote_code_files

    model_dir = Path(model_dir)
    for name, source in remote_code_files(_helmlm_version()).items():
        (model_dir / name).write_text(source)
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _helmlm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("helmlm")
    except PackageNotFoundError:  # a source checkout on sys.path
        return "(source)"


def save_model_dir(model: HELMForCausalLM, tokenizer, out_dir: str | Path, format: str = "helm",
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to the new directory ``out_dir``; return it.

    ``format`` (:data:`FORMATS`): ``helm`` writes the HELM classes with their remote code, ``llama`` a standard
    ``LlamaForCausalLM`` (:func:`to_llama`; the LLaMA-style twin only), ``auto`` the latter where the architecture
    allows. The tokenizer's ``model_max_length`` is set to the model's context (not transformers' "unlimited"
    1e30), and every file gets the mode a plain ``open`` gives (``save_pretrained`` writes some through temporary
    files, created 0600)."""
    out = check_new_dir(out_dir)
    kind = resolve_format(model.config, format)
    with exclusive(out, "this model directory", side=True):
        check_new_dir(out)  # final, now that no other process can write it
        needed = sum(t.nbytes for t in model.state_dict().values()) + (16 << 20)  # weights, plus tokenizer files
        then = f"nothing was written to {out}; the source is untouched"
        check_free_space(out.parent, needed, f"the model directory {out.name}", then)
        with disk_errors(f"the model directory {out.name}", out.parent, needed, then):
            _write_model_dir(model, tokenizer, out, kind, extra_files or {})
    return out


def _write_model_dir(model: HELMForCausalLM, tokenizer, out: Path, kind: str, extra_files: dict[str, str]) -> None:
    """Write the directory under a temporary name, then rename it to ``out``; nothing is left behind on failure."""
    tokenizer.model_max_length = model.config.max_position_embeddings
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if kind == "llama":
            to_llama(model).save_pretrained(tmp)
        else:
            with _without_code_copies(model, model.config):
                model.save_pretrained(tmp)
            write_remote_code(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():  # a model card, say
            (tmp / name).write_text(text)
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(0o666 & ~umask)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
