"""Load checkpoints of the reference HELM implementation (Graph-and-Geometric-Learning/helm).

``load_reference(state_dict_or_path, **reference_flags)`` returns a :class:`HELMForCausalLM` that computes the
same function as the reference model built with those flags and weights. The flags are the reference's argparse
namespace (``config/args.py``): pass the ones the checkpoint was trained with, e.g. ``load_reference(path,
model_name="HELM_D", arch="L6_W390_A6", vocab_size=128256, max_seq_len=2048)``, or the whole namespace with
``**vars(args)``; training-only flags are ignored.

What changes on the way in: the reference's separate ``Wq/Wk/Wv`` become one fused ``qkv`` projection; its dead
parameters are dropped (the attention's additive score ``bias``, which cancels in the softmax, and the embedding's
unused ``add_pos`` residual); its buffers (``attn_mask``, ``freqs_complex``) are dropped because we build masks and
rotary tables on the fly; the curvature aliases every layer registers (``*.k``, ``*.c``) are checked to agree and
become ``config.curvature``. Files are read without unpickling (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from helmlm.errors import ReferenceCompatError  # noqa: F401  (re-exported)
from helmlm.models.config import ConfigError, HELMConfig
from helmlm.models.modeling import HELMForCausalLM

# The reference's argparse namespace (config/args.py) with its defaults. Flags that shape a HELM-D model are read;
# the others (training, HELM-MiCE) are accepted and ignored here.
REFERENCE_DEFAULTS: dict[str, Any] = {
    # training_config
    "train": True, "min_lr_ratio": 0.1, "warm_up_ratio": 0.03, "seed": 1234, "lr": 4e-4, "weight_decay": 0.01,
    "packing_ratio": 3.0, "gradient_accumulation_steps": 256, "CHECKPOINT_DIR": "../ckpt", "log_dir": "../log",
    "data_path": "../data", "model_name": "HELM_MiCE", "find_unused_parameters": True, "max_batch_size": 1,
    "max_seq_len": 2048, "project_emb": False, "vocab_size": 128256,
    # model_config
    "dim": 910, "inter_dim": 3640, "mice_inter_dim": 1820, "n_layers": 16, "n_dense_layers": 1, "n_heads": 14,
    "n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 2, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "bias_update_speed": 0.005,
    "seq_bal_alpha": 1e-4, "train_curv": True, "q_lora_rank": 0, "kv_lora_rank": 257, "qk_nope_head_dim": 65,
    "qk_rope_head_dim": 65, "v_head_dim": 65, "original_seq_len": 2048, "rope_theta": 10000, "rope_factor": 40,
    "beta_fast": 32, "beta_slow": 1, "arch": "L6_W390_A6",
}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_HELM_D_ROPE_THETA = 10000.0  # hard-coded in the reference's HELM-D (helm_d.py)


def parse_arch(arch: str) -> tuple[int, int, int]:
    """Parse the reference's ``"L{layers}_W{width}_A{heads}"`` (heads default to ``width // 64``, as there)."""
    layers, width, heads = (re.search(p, arch) for p in (r"L(\d+)", r"W(\d+)", r"A(\d+)"))
    if layers is None or width is None:
        raise ReferenceCompatError(
            f"arch {arch!r} is not of the form 'L<layers>_W<width>_A<heads>' (e.g. 'L6_W390_A6')")
    n_layers, n_width = int(layers.group(1)), int(width.group(1))
    n_heads = int(heads.group(1)) if heads else n_width // 64
    if n_heads == 0:
        raise ReferenceCompatError(f"arch {arch!r}: no head count given and width {n_width} < 64; add '_A<heads>'")
    return n_layers, n_width, n_heads


def reference_config(**reference_flags: Any) -> HELMConfig:
    """The :class:`HELMConfig` of the reference model built with these flags (validated)."""
    unknown = sorted(set(reference_flags) - set(REFERENCE_DEFAULTS))
    if unknown:
        raise ReferenceCompatError(
            f"unknown reference flags {unknown}; the reference namespace (config/args.py) has "
            f"{', '.join(sorted(REFERENCE_DEFAULTS))}")
    flags = {**REFERENCE_DEFAULTS, **reference_flags}
    name = flags["model_name"]
    if name == "HELM_D":
        layers, width, heads = parse_arch(flags["arch"])
        config = HELMConfig(
            vocab_size=int(flags["vocab_size"]), hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=4 * width,
            max_position_embeddings=int(flags["max_seq_len"]), geometry="lorentz", curvature=1.0,
            rope_theta=_HELM_D_ROPE_THETA, residual_scale=4.0 * width ** 0.5,
            attention_temperature=float(width) ** 0.5, rms_norm_eps=1e-8, project_emb=False,
        )
        where = f"arch {flags['arch']!r} (width {width}, {heads} heads)"
    elif name == "HELM_MiCE":
        if flags["q_lora_rank"]:
            raise ReferenceCompatError(
                f"q_lora_rank={flags['q_lora_rank']}: the reference's low-rank query path does not run (its "
                "q_norm has the wrong size), so no checkpoint can have been trained with it; use q_lora_rank=0")
        if flags["max_seq_len"] > flags["original_seq_len"]:
            raise ReferenceCompatError(
                f"max_seq_len={flags['max_seq_len']} > original_seq_len={flags['original_seq_len']} selects the "
                "reference's YaRN path, which crashes there (undefined args.mscale); no such checkpoint exists")
        dim, heads = int(flags["dim"]), int(flags["n_heads"])
        config = HELMConfig(
            vocab_size=int(flags["vocab_size"]), hidden_size=dim, num_hidden_layers=int(flags["n_layers"]),
            num_attention_heads=heads, intermediate_size=int(flags["inter_dim"]),
            max_position_embeddings=int(flags["max_seq_len"]), geometry="lorentz", attention="mla", ffn="moe",
            curvature=1.0, rope_theta=float(flags["rope_theta"]), residual_scale=dim ** 0.5,
            attention_temperature=(heads * (flags["qk_nope_head_dim"] + flags["qk_rope_head_dim"])) ** 0.5,
            rms_norm_eps=1e-8, project_emb=bool(flags["project_emb"]),
            kv_lora_rank=int(flags["kv_lora_rank"]), qk_nope_head_dim=int(flags["qk_nope_head_dim"]),
            qk_rope_head_dim=int(flags["qk_rope_head_dim"]), v_head_dim=int(flags["v_head_dim"]), mla_init="xavier",
            n_dense_layers=int(flags["n_dense_layers"]), n_routed_experts=int(flags["n_routed_experts"]),
            n_activated_experts=int(flags["n_activated_experts"]), n_shared_experts=int(flags["n_shared_experts"]),
            moe_intermediate_size=int(flags["mice_inter_dim"]), score_func=flags["score_func"],
            route_scale=float(flags["route_scale"]), n_expert_groups=int(flags["n_expert_groups"]),
            n_limited_groups=int(flags["n_limited_groups"]), expert_curvatures=[1.0] * int(flags["n_routed_experts"]),
            learn_expert_curvature=bool(flags["train_curv"]), moe_combine="reference",
        )
        where = f"HELM_MiCE flags (dim {dim}, {heads} heads)"
    else:
        raise ReferenceCompatError(f"model_name must be 'HELM_D' or 'HELM_MiCE', got {name!r}")
    try:
        config.validate()
    except ConfigError as err:
        raise ReferenceCompatError(f"{where} {'is' if where.startswith('arch') else 'are'} invalid: {err}") from None
    return config


def _read_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ReferenceCompatError(f"reference checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only=True: never unpickle arbitrary objects from a file a user hands us.
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and "model_state_dict" in state:
                state = state["model_state_dict"]
            if not isinstance(state, Mapping):
                raise ReferenceCompatError(f"{path} holds a {type(state).__name__}, not a state dict")
            state = dict(state)
    for prefix in _WRAPPER_PREFIXES:  # strip DDP / torch.compile / fixture wrappers, one level each
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_curvature_alias(key: str) -> bool:
    """The many registrations of the same curvature Parameter (HyperCore's ``Lorentz.k``/``.c`` aliases)."""
    return key.endswith((".k", ".c")) or key in ("k", "c")


def _common_key_map(config: HELMConfig, *, embed: str, norm: str, head: str, layers: str,
                    block: dict[str, str]) -> tuple[dict[str, list[str]], set[str]]:
    """The keys both reference models map one to one: embedding, final projection, final norm and head, and per
    block (reference prefix ``{layers}.{i}``) the entries of ``block`` (helmlm suffix -> reference suffix); plus the
    dead per-block attention ``bias``."""
    key_map: dict[str, list[str]] = {
        "model.embed.weight": [embed],
        "model.final_proj.weight": ["final_proj.linear.weight"],
        "model.final_proj.bias": ["final_proj.linear.bias"],
        "model.norm.weight": [norm],
        "lm_head.weight": [head],
    }
    dead = set()
    for i in range(config.num_hidden_layers):
        key_map.update({f"model.layers.{i}.{ours}": [f"{layers}.{i}.{ref}"] for ours, ref in block.items()})
        dead.add(f"{layers}.{i}.attn.bias")
    return key_map, dead


def _helm_d_key_map(config: HELMConfig) -> tuple[dict[str, list[str]], set[str]]:
    """Map each helmlm parameter to the reference key(s) it is built from; plus the droppable reference keys."""
    key_map, dead = _common_key_map(
        config, embed="token_embed.embedding", norm="ln_final.weight", head="mapping.weight", layers="resblocks",
        block={"attn.temperature": "attn.scale", "attn_norm.weight": "ln_1.weight", "ffn_norm.weight": "ln_2.weight",
               "attn_residual.weight": "res1.w_y", "ffn_residual.weight": "res2.w_y"})
    dead |= {"token_embed.add_pos.w_y", "token_embed.add_pos.scale", "attn_mask", "freqs_complex"}
    for i in range(config.num_hidden_layers):
        ref, ours = f"resblocks.{i}", f"model.layers.{i}"
        for p in ("weight", "bias"):
            key_map[f"{ours}.attn.qkv.{p}"] = [f"{ref}.attn.W{x}.{p}" for x in "qkv"]
            key_map[f"{ours}.attn.out.{p}"] = [f"{ref}.attn.final_linear.{p}"]
            for w in ("w1", "w2", "w3"):
                key_map[f"{ours}.ffn.{w}.{p}"] = [f"{ref}.mlp.{w}.linear.{p}"]
    return key_map, dead


def _helm_mice_key_map(config: HELMConfig) -> tuple[dict[str, list[str]], set[str]]:
    """As :func:`_helm_d_key_map`, for the reference's LorentzDeepSeekV3 (HMLA + MiCE)."""
    key_map, dead = _common_key_map(
        config, embed="embed.weight" if config.project_emb else "embed.embedding", norm="norm.weight",
        head="head.weight", layers="layers",
        block={"attn.kv_norm.weight": "attn.kv_norm.weight", "attn.temperature": "attn.softmax_scale",
               "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
               "attn_residual.weight": "attn_res.w_y", "ffn_residual.weight": "ffn_res.w_y"})
    dead |= {"embed.add_pos.w_y", "embed.add_pos.scale", "attn_mask", "freqs_cis"}
    experts = range(config.n_routed_experts)
    for i in range(config.num_hidden_layers):
        ref, ours = f"layers.{i}", f"model.layers.{i}"
        for lin in ("wq", "wkv_a", "wkv_b", "wo"):
            for p in ("weight", "bias"):
                key_map[f"{ours}.attn.{lin}.{p}"] = [f"{ref}.attn.{lin}.linear.{p}"]
        if not config.is_moe_layer(i):
            for w in ("w1", "w2", "w3"):
                for p in ("weight", "bias"):
                    key_map[f"{ours}.ffn.{w}.{p}"] = [f"{ref}.ffn.{w}.linear.{p}"]
            continue
        key_map[f"{ours}.ffn.gate.weight"] = [f"{ref}.ffn.gate.weight"]
        key_map[f"{ours}.ffn.gate.bias"] = [f"{ref}.ffn.gate.bias"]
        for w in ("w1", "w2", "w3"):
            for p, ours_p in (("weight", w), ("bias", "b" + w[1])):
                key_map[f"{ours}.ffn.experts.{ours_p}"] = [f"{ref}.ffn.experts.{j}.{w}.linear.{p}" for j in experts]
                if config.n_shared_experts:
                    key_map[f"{ours}.ffn.shared.{w}.{p}"] = [f"{ref}.ffn.shared_experts.{w}.linear.{p}"]
        key_map[f"{ours}.ffn.experts.log_curvature"] = [f"{ref}.ffn.experts.{j}.expert_manifold.k" for j in experts]
        if config.n_shared_experts:
            key_map[f"{ours}.ffn.shared_residual.weight"] = [f"{ref}.ffn.add_experts.w_y"]
            key_map[f"{ours}.ffn.shared_residual.log_scale"] = [f"{ref}.ffn.add_experts.scale"]
    return key_map, dead


_STACKED = (".ffn.experts.w1", ".ffn.experts.w2", ".ffn.experts.w3", ".ffn.experts.b1", ".ffn.experts.b2",
            ".ffn.experts.b3")


def _convert(name: str, tensors: list[Tensor]) -> Tensor:
    """Combine the reference tensors of one helmlm parameter: stack experts, log the curvatures, fuse q/k/v."""
    if name.endswith(".ffn.experts.log_curvature"):
        values = torch.stack([t.reshape(()) for t in tensors])
        if (values <= 0).any():
            raise ReferenceCompatError(f"{name}: the checkpoint has non-positive expert curvatures {values.tolist()}")
        return values.log()
    if name.endswith(_STACKED):
        return torch.stack(tensors)
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _curvature(state: dict[str, Tensor]) -> float:
    values = {k: float(v) for k, v in state.items()
              if _is_curvature_alias(k) and v.numel() == 1 and ".experts." not in k}
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        by_value = {val: [k for k, v in values.items() if v == val][:3] for val in distinct}
        raise ReferenceCompatError(
            f"the checkpoint's manifolds have different curvatures {by_value}; helmlm's HELM-D uses one curvature "
            "for input, hidden and output manifolds (the reference always uses 1.0)")
    return distinct[0] if distinct else 1.0


def load_reference(
    state_dict_or_path: str | Path | Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    **reference_flags: Any,
) -> HELMForCausalLM:
    """Build the helmlm model equivalent to a reference HELM checkpoint.

    Args:
        state_dict_or_path: a state dict with the reference's key names, a ``.safetensors`` file, or a ``.pt``
            training checkpoint (its ``model_state_dict``); ``module.``/``model.`` prefixes are stripped.
        dtype: parameter dtype of the returned model; default: the checkpoint's floating dtype.
        **reference_flags: the reference's training flags (``model_name``, ``arch``, ``vocab_size``,
            ``max_seq_len``, ...); unspecified flags take the reference's defaults.
    """
    config = reference_config(**reference_flags)
    state = _read_state_dict(state_dict_or_path)
    key_map, dead = (_helm_mice_key_map if config.attention == "mla" else _helm_d_key_map)(config)

    needed = {k for keys in key_map.values() for k in keys}
    missing = sorted(needed - set(state))
    unexpected = sorted(k for k in state if k not in needed and k not in dead and not _is_curvature_alias(k))
    model_name = reference_flags.get("model_name", REFERENCE_DEFAULTS["model_name"])
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
        raise ReferenceCompatError(
            f"reference state dict does not match a {model_name} model "
            + (f"with arch {reference_flags.get('arch', REFERENCE_DEFAULTS['arch'])!r}: " if model_name == "HELM_D"
               else "with these flags: ")
            + "; ".join(parts) + ". Check model_name and the architecture flags against the checkpoint's.")

    config.curvature = _curvature(state)
    if dtype is None:
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = HELMForCausalLM(config).to(dtype)

    ours = model.state_dict()
    mapped = {}
    for name, ref_keys in key_map.items():
        tensor = _convert(name, [state[k] for k in ref_keys])
        tensor = tensor.reshape(ours[name].shape) if tensor.numel() == ours[name].numel() == 1 else tensor
        if tuple(tensor.shape) != tuple(ours[name].shape):
            shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in ref_keys)
            raise ReferenceCompatError(
                f"shape mismatch: {shapes} -> {name} expects {tuple(ours[name].shape)} for vocab_size="
                f"{config.vocab_size}, arch width {config.hidden_size}, {config.num_attention_heads} heads; "
                "pass the flags the checkpoint was trained with")
        mapped[name] = tensor.to(dtype)
    freqs = state.get("freqs_complex")
    if freqs is not None and freqs.shape[0] != config.max_position_embeddings:
        raise ReferenceCompatError(
            f"the checkpoint was built with max_seq_len={freqs.shape[0]} (freqs_complex buffer), but "
            f"max_seq_len={config.max_position_embeddings} was given; pass max_seq_len={freqs.shape[0]}")
    # Buffers we own and the reference does not store (the MoE token counters) keep their initial values.
    own = {k for k in ours if k not in mapped and k.endswith("tokens_per_expert")}
    model.load_state_dict(mapped, strict=not own)
    return model.eval()
