"""The HELM decoder: one model class whose blocks are assembled from the config's geometry choice.

``HELMForCausalLM`` with ``geometry="lorentz"`` is HELM-D (Lorentz embedding -> blocks of [hyperbolic RMSNorm ->
Lorentz MHA with HoPE -> Lorentzian residual -> hyperbolic RMSNorm -> HFFN -> Lorentzian residual] -> LorentzLinear
-> hyperbolic RMSNorm -> linear head over the full Lorentz vector); with ``geometry="euclidean"`` it is the
LLaMA-style twin (embedding -> pre-norm blocks with RoPE MHA and SwiGLU -> RMSNorm -> head). ``attention="mla"``
and ``ffn="moe"`` swap in HMLA and MiCE (HELM-MiCE), or MLA and MoE for the DeepSeek-style twin.

``HELMForCausalLM`` is a transformers ``GenerationMixin``: ``model.generate(...)`` (greedy, sampling, beam search,
``pipeline("text-generation")``) decodes over :class:`HELMCache`, a ``transformers.Cache`` that holds our own
per-layer buffers (:mod:`helmlm.nn.cache`), so the HMLA latent cache works as it does in our own engine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from helmlm.errors import InputError  # noqa: F401  (re-exported)
from helmlm.geometry import promote
from helmlm.models.config import HELMConfig
from helmlm.models.hybrid import COMPONENTS, HybridBlock, cross, hybrid_embedding, hybrid_head
from helmlm.nn import (
    LatentAttention,
    LorentzEmbedding,
    LorentzFeedForward,
    LorentzLatentAttention,
    LorentzLinear,
    LorentzResidual,
    LorentzRMSNorm,
    LorentzSelfAttention,
    MiCE,
    MoE,
    RMSNorm,
    RoutedFFN,
    SelfAttention,
    SwiGLU,
    document_causal_mask,
    rotary_tables,
    routed_layers,
)
from helmlm.nn.cache import LayerCache, ModelCache, StaticModelCache
from helmlm.nn.loss import linear_cross_entropy


def routing_settings(config: HELMConfig) -> dict[str, Any]:
    """The routed-FFN arguments that MiCE and MoE share, under the config's names."""
    return {"n_routed_experts": config.n_routed_experts, "n_activated_experts": config.n_activated_experts,
            "n_shared_experts": config.n_shared_experts, "score_func": config.score_func,
            "route_scale": config.route_scale, "n_expert_groups": config.n_expert_groups,
            "n_limited_groups": config.n_limited_groups, "dispatch": config.moe_dispatch,
            "gate_init_gain": config.gate_init_gain}


class LorentzBlock(nn.Module):
    """Pre-norm hyperbolic block: ``h = res1(h, attn(norm1(h)))``, ``h = res2(h, ffn(norm2(h)))``."""

    def __init__(self, config: HELMConfig, index: int = 0):
        super().__init__()
        ambient, c, eps = config.hidden_size, config.curvature, config.rms_norm_eps
        scale, tau = config.resolved_residual_scale(), config.resolved_attention_temperature()
        self.attn_norm = LorentzRMSNorm(ambient - 1, eps, c)
        if config.attention == "mla":
            self.attn = LorentzLatentAttention(ambient, config.num_attention_heads, config.kv_lora_rank,
                                               config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                                               c, tau, eps, init=config.mla_init)
        else:
            self.attn = LorentzSelfAttention(ambient, config.num_attention_heads, c, tau)
        self.attn_residual = LorentzResidual(scale=scale, curvature=c)
        self.ffn_norm = LorentzRMSNorm(ambient - 1, eps, c)
        if config.is_moe_layer(index):
            self.ffn = MiCE(ambient, config.moe_intermediate_size, **routing_settings(config),
                            curvatures=config.resolved_expert_curvatures(),
                            learn_curvature=config.learn_expert_curvature, combine=config.moe_combine,
                            renormalize=config.resolved_moe_renormalize(), curvature=c)
        else:
            self.ffn = LorentzFeedForward(ambient, config.intermediate_size, c)
        self.ffn_residual = LorentzResidual(scale=scale, curvature=c)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, valid: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        h = self.attn_residual(h, self.attn(self.attn_norm(h), cos, sin, mask, cache))
        x = self.ffn_norm(h)
        return self.ffn_residual(h, self.ffn(x, valid) if isinstance(self.ffn, RoutedFFN) else self.ffn(x))


class EuclideanBlock(nn.Module):
    """Pre-norm block: ``h = h + attn(norm1(h))``, ``h = h + ffn(norm2(h))``; LLaMA (MHA + SwiGLU) or
    DeepSeek-style (MLA + MoE after the first ``n_dense_layers``)."""

    def __init__(self, config: HELMConfig, index: int = 0):
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.attn_norm = RMSNorm(dim, eps)
        if config.attention == "mla":
            self.attn = LatentAttention(dim, config.num_attention_heads, config.kv_lora_rank,
                                        config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, eps)
        else:
            self.attn = SelfAttention(dim, config.num_attention_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        if config.is_moe_layer(index):
            self.ffn = MoE(dim, config.moe_intermediate_size, **routing_settings(config),
                           renormalize=config.resolved_moe_renormalize())
        else:
            self.ffn = SwiGLU(dim, config.intermediate_size)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, valid: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, cache)
        x = self.ffn_norm(h)
        return h + (self.ffn(x, valid) if isinstance(self.ffn, RoutedFFN) else self.ffn(x))


class HELMPreTrainedModel(PreTrainedModel):
    config_class = HELMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # per block: HELMModel.forward
    _no_split_modules = ["LorentzBlock", "EuclideanBlock"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` (safetensors, never pickle: ``use_safetensors`` defaults to True here),
        then the Lorentz embedding table is made a geoopt ``ManifoldParameter`` again (the loader swaps in plain
        ``Parameter`` s)."""
        kwargs.setdefault("use_safetensors", True)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for module in model.modules():
            if isinstance(module, LorentzEmbedding):
                module.restore_manifold_parameter()
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Plain ``nn.Linear``: PyTorch's default (as the reference), the head ``N(0, head_init_std^2)`` when that
        is set; embeddings of the twin: N(0, initializer_range^2); helmlm layers: their own ``reset_parameters``
        (documented on each layer)."""
        if module is getattr(self, "lm_head", None) and self.config.head_init_std is not None:
            nn.init.normal_(module.weight, std=self.config.head_init_std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.Linear) or (
            type(module).__module__.startswith("helmlm.nn") and hasattr(module, "reset_parameters")
        ):
            module.reset_parameters()


class HELMModel(HELMPreTrainedModel):
    """Embedding, blocks and final normalisation; returns the last hidden states ``(B, N, hidden_size)``."""

    def __init__(self, config: HELMConfig):
        config.validate()
        super().__init__(config)
        width, c = config.hidden_size, config.curvature  # ambient coordinates (lorentz) or features (euclidean)
        # A hybrid (config.swapped_components): each part in its own geometry, values crossing at the origin
        self.geometries = {part: config.component_geometry(part) for part in COMPONENTS} \
            if config.swapped_components else None
        if self.geometries:
            self.embed = hybrid_embedding(config, self.geometries["embedding"])
            self.layers = nn.ModuleList(HybridBlock(config, self.geometries)
                                        for _ in range(config.num_hidden_layers))
            self.final_proj, self.norm = hybrid_head(config, self.geometries["head"])
        elif config.is_lorentz:
            self.embed = LorentzEmbedding(config.vocab_size, width - 1, c, manifold_table=not config.project_emb,
                                          init_scale=config.embedding_init_scale)
            self.layers = nn.ModuleList(LorentzBlock(config, i) for i in range(config.num_hidden_layers))
            self.final_proj = LorentzLinear(width, width - 1, curvature=c) if config.final_projection else None
            self.norm = LorentzRMSNorm(width - 1, config.rms_norm_eps, c)
        else:
            self.embed = nn.Embedding(config.vocab_size, width)
            self.layers = nn.ModuleList(EuclideanBlock(config, i) for i in range(config.num_hidden_layers))
            self.final_proj = None
            self.norm = RMSNorm(width, config.rms_norm_eps)
        # True (train.activation_checkpointing, or transformers' activation_checkpointing_enable()): each block keeps
        # only its input and runs again in backward
        self.gradient_checkpointing = False
        self.post_init()

    def check_inputs(self, input_ids: Tensor, document_ids: Tensor | None, position_ids: Tensor | None,
                     attention_mask: Tensor | None = None, past: int = 0) -> None:
        """Clear errors for bad inputs, raised before any layer runs (skipped while compiling)."""
        cfg = self.config
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dim() != 2:
            raise InputError(f"input_ids must be an integer tensor of shape (batch, seq_len); got "
                             f"dtype {input_ids.dtype}, shape {tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        if n == 0:
            raise InputError("input_ids is empty (seq_len 0); pass at least one token")
        if past + n > cfg.max_position_embeddings:
            cached = f" ({past} cached + {n} new)" if past else ""
            raise InputError(f"sequence length {past + n}{cached} exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings}; split the input into windows or build the model with a "
                             "larger max_position_embeddings")
        for name, t in (("document_ids", document_ids), ("position_ids", position_ids),
                        ("attention_mask", attention_mask)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise InputError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
        if torch.compiler.is_compiling():
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = hi if hi >= cfg.vocab_size else lo
            raise InputError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); check that the "
                             "tokenizer matches the model (vocab_size in the model config)")
        if attention_mask is not None and document_ids is not None and int(document_ids.min()) < 0:
            raise InputError("document_ids must be >= 0 when an attention_mask is given (negative ids are used "
                             "internally for padding)")

    def forward(self, input_ids: Tensor, document_ids: Tensor | None = None, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: ModelCache | None = None) -> Tensor:
        """``attention_mask (B, N)``: 1 for real tokens, 0 for padding. Each padding token becomes a one-token
        document of its own (ids ``-1 - position``), so no real token attends to padding, no attention row is
        empty, no loss target crosses into padding, and routed layers leave padding out of their balance loss and
        statistics.

        ``cache``: a :class:`~helmlm.nn.cache.ModelCache` of earlier tokens, extended by these; ``attention_mask``
        then marks the *new* tokens (the cache keeps the mask of the old ones), or all cached + new tokens as
        transformers passes it (only the new part is read), and positions continue from the cache length unless
        ``position_ids`` are given (left-padded prompts pass their own)."""
        past = 0 if cache is None else cache.length
        if cache is not None and attention_mask is not None and past and attention_mask.shape[-1] == past + \
                input_ids.shape[-1]:
            attention_mask = attention_mask[:, past:]  # transformers' convention: the mask of cached + new tokens
        self.check_inputs(input_ids, document_ids, position_ids, attention_mask, past)
        valid = None if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            position_ids = (past + torch.arange(input_ids.shape[1], device=input_ids.device)).unsqueeze(0)
        if cache is None:
            document_ids = padded_document_ids(document_ids, attention_mask)
            mask = None if document_ids is None else document_causal_mask(document_ids)
        else:
            if document_ids is not None:
                raise InputError("document_ids cannot be used with a cache; decode one document per row")
            mask = cache.attention_mask(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        return self.trunk(input_ids, position_ids, mask, valid, None if cache is None else cache.layers)

    def trunk(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None, valid: Tensor | None = None,
              caches: list | None = None) -> Tensor:
        """Embedding, blocks and final normalisation, given positions, the attention mask (``None``: causal) and
        the per-layer caches: what :meth:`forward` runs after checking its inputs, and what
        :meth:`HELMForCausalLM.static_step` runs without host reads."""
        h = self.embed(input_ids)
        if self.geometries:
            h = cross(h, self.geometries["embedding"], self.geometries["residual"], self.config.curvature)
        cos, sin = rotary_tables(position_ids, self.config.rotary_dim, self.config.rope_theta, h.dtype)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        run = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint  # transformers' function if set
        for layer, layer_cache in zip(self.layers, caches or [None] * len(self.layers)):
            if checkpointing:  # routed layers count their experts twice; their balance uses shares, unchanged
                h = run(layer.__call__, h, cos, sin, mask, valid, layer_cache)
            else:
                h = layer(h, cos, sin, mask, valid, layer_cache)
        if self.geometries:
            h = cross(h, self.geometries["residual"], self.geometries["head"], self.config.curvature)
        if self.final_proj is not None:
            return self.norm(self.final_proj(h, return_space=True), space_only=True)
        return self.norm(h)  # a Lorentz norm reads the point's space part

    def compile_blocks(self) -> None:
        """``torch.compile`` each block in place (``train.compile=true``): one graph per block kind (tested to have
        no graph breaks), while the embedding, the head and the loss stay eager."""
        for layer in self.layers:
            layer.compile()


def _checkpoint(function, *args):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def padded_document_ids(document_ids: Tensor | None, attention_mask: Tensor | None) -> Tensor | None:
    """Document ids with every padding token (``attention_mask == 0``) made a one-token document ``-1 - position``;
    real tokens keep ``document_ids`` (or 0). ``None`` when neither is given. (With a cache, the same semantics
    come from :meth:`~helmlm.nn.cache.ModelCache.attention_mask`.)"""
    if attention_mask is None:
        return document_ids
    n = attention_mask.shape[-1]
    pad_ids = -1 - torch.arange(n, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), 0 if document_ids is None else document_ids, pad_ids)


def lm_targets(labels: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """Next-token targets ``(B, N - 1)``: ``labels[:, 1:]``, with ``-100`` wherever the next token belongs to another
    document (so no position predicts across a packing boundary or into padding)."""
    targets = labels[:, 1:]
    if document_ids is not None:
        targets = targets.masked_fill(document_ids[:, 1:] != document_ids[:, :-1], -100)
    return targets


def position_targets(labels: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """:func:`lm_targets` aligned with the positions, ``(B, N)``: the last position's target is ``-100``.

    The losses shift the targets, not the outputs: slicing off the last position of ``(B, N, vocab)`` logits would
    copy them (and zero-fill a same-sized gradient in backward); an ignored target in the last position costs
    nothing."""
    return F.pad(lm_targets(labels, document_ids), (0, 1), value=-100)


def causal_lm_loss(logits: Tensor, labels: Tensor, document_ids: Tensor | None = None,
                   reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in fp32 or higher over :func:`lm_targets` (``-100`` ignored), averaged (``mean``) or
    summed (``sum``, for token-weighted averaging across micro-batches and ranks)."""
    targets = position_targets(labels, document_ids)
    return F.cross_entropy(promote(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100, reduction=reduction)


# transformers renamed the output field ``past_key_values`` to ``cache`` in its 5.x series and warns whenever the old
# name is written or read; the model writes the field under the name the installed version defines.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output: MoeCausalLMOutputWithPast) -> ModelCache | None:
    """The KV cache of a forward output, whichever transformers version named the field."""
    return output.get(CACHE_FIELD)


class HELMLayerCache(LayerCache, CacheLayerMixin):
    """One layer of :class:`HELMCache`: our growing buffers (keys and values, or the HMLA latent cache) behind
    transformers' layer interface. ``update(key, value)`` appends two tensors; the model's layers call
    :meth:`~helmlm.nn.cache.LayerCache.append` with whatever they cache."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        CacheLayerMixin.__init__(self)
        LayerCache.__init__(self)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: buffers are allocated by the first append."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return self.append(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1


class HELMCache(ModelCache, Cache):
    """The KV cache of a HELM model as a ``transformers.Cache``: one :class:`HELMLayerCache` per layer plus the
    real-token mask (:class:`~helmlm.nn.cache.ModelCache`). What ``GenerationMixin`` calls (``get_seq_length``,
    ``reorder_cache`` for beam search, ``batch_select_indices``, ``batch_repeat_interleave``, ``crop``) acts on every
    buffer of every layer and on the mask. Not compileable (the buffers grow)."""

    layer_class = HELMLayerCache

    def __init__(self, num_layers: int) -> None:
        ModelCache.__init__(self, num_layers)
        Cache.__init__(self, layers=self.layers)


class HELMForCausalLM(HELMPreTrainedModel, GenerationMixin):
    """A HELM decoder with a linear language-model head (over the full Lorentz vector for ``lorentz``).

    ``forward(input_ids, labels=None, document_ids=None, position_ids=None, attention_mask=None)``:
    ``document_ids`` ``(B, N)`` mark the packed documents of each row, and tokens attend only within their own
    document; ``attention_mask`` marks real tokens (see :meth:`HELMModel.forward`); ``labels`` are the input ids
    (shifted inside, ``-100`` ignored). Returns a ``MoeCausalLMOutputWithPast`` with ``logits``; for models with
    routed layers ``aux_loss``, the sum of their sequence-level balance losses; given labels, ``loss`` =
    cross-entropy + ``moe_balance_alpha * aux_loss``.

    ``generate()`` is transformers' (``GenerationMixin``): the model builds its own :class:`HELMCache` on the first
    forward with ``use_cache=True`` (not transformers' ``DynamicCache``, whose ``update(key, value)`` cannot hold the
    HMLA latent cache), and :meth:`prepare_inputs_for_generation` feeds only the new tokens once the cache holds the
    earlier ones, at positions counted from each row's first real token (left padding).
    """

    loss_chunk_tokens: int = 0  # > 0: the loss over labels runs the head over this many tokens at a time (forward)

    def __init__(self, config: HELMConfig):
        super().__init__(config)
        self.model = HELMModel(config)
        self.lm_head = nn.Linear(config.hidden_out, config.vocab_size, bias=False)
        self.post_init()

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one token adds to the KV cache (all layers, one sequence) in ``dtype`` (default: the model's)."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        return self.config.kv_cache_floats_per_token() * itemsize

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """``generate`` must not create a ``DynamicCache``: the model creates its :class:`HELMCache` itself."""
        return False

    def new_cache(self) -> HELMCache:
        """An empty KV cache for this model (what ``forward(..., use_cache=True)`` starts from)."""
        return HELMCache(len(self.model.layers))

    def own_cache(self, cache: Any) -> ModelCache | None:
        """``cache`` if it is ours; an empty transformers ``Cache`` of another kind (e.g. a ``DynamicCache`` that a
        tool created) is replaced by a :class:`HELMCache`; a filled one cannot be read and is an error."""
        if cache is None or isinstance(cache, ModelCache):
            return cache
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            return self.new_cache()
        raise InputError(f"a {type(cache).__name__} cannot be used as a HELM KV cache; pass a HELMCache "
                         "(model.new_cache()) or the cache a previous forward returned")

    def static_step(self, input_ids: Tensor, position_ids: Tensor, cache: StaticModelCache) -> Tensor:
        """Logits ``(B, vocab)`` of the last of the new tokens ``input_ids (B, N)`` at ``position_ids``, attending
        to a :class:`~helmlm.nn.cache.StaticModelCache`: the cached forward with fixed shapes, no input checks and
        no host reads, which ``torch.compile`` traces as one graph (``helmlm.generation``'s compiled
        decoding). The caller checks room first and advances the cache after (``check_room``, ``advance``)."""
        mask = cache.attention_mask(torch.ones_like(input_ids))
        hidden = self.model.trunk(input_ids, position_ids, mask, None, cache.layers)
        return self.lm_head(hidden[:, -1])

    def prepare_inputs_for_generation(self, input_ids: Tensor, **kwargs) -> dict[str, Any]:
        """transformers' preparation (only the new tokens once a cache exists), with ``position_ids`` from the
        attention mask when none are given: each row counts from its first real token, so left-padded rows decode
        like their unpadded prompts."""
        attention_mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and attention_mask is not None and attention_mask.dim() == 2:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        n = inputs["input_ids"].shape[-1]
        if inputs.get("position_ids") is not None and inputs["position_ids"].shape[-1] != n:
            inputs["position_ids"] = inputs["position_ids"][..., -n:]
        return inputs

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        document_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: ModelCache | None = None,
        use_cache: bool = False,
        cache: ModelCache | None = None,
        logits_to_keep: int | Tensor = 0,
        loss_reduction: str = "mean",
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """``logits_to_keep``: logits of the last ``k`` positions only (0: all; a tensor: those positions), what
        ``generate`` asks for to skip the head over the prompt. Ignored when ``labels`` are given.

        ``loss_reduction``: ``mean`` (the loss above) or ``sum``: the summed cross-entropy alone, for callers that
        weigh tokens across micro-batches and ranks and add ``aux_loss`` themselves (the trainer). With
        :attr:`loss_chunk_tokens` > 0 and ``labels``, the loss comes from :func:`~helmlm.nn.loss.linear_cross_entropy`
        over that many tokens at a time and ``logits`` is ``None``: the full logits are never held."""
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        past_key_values = self.own_cache(cache if cache is not None else past_key_values)  # 5.x calls it ``cache``
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        hidden = self.model(input_ids, document_ids=document_ids, position_ids=position_ids,
                            attention_mask=attention_mask, cache=past_key_values)
        if labels is None and isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        elif labels is None and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        aux = [layer.aux_loss for _, layer in routed_layers(self.model)]
        aux_loss = torch.stack(aux).sum() if aux else None
        loss = logits = None
        if labels is not None and self.loss_chunk_tokens > 0:
            targets = position_targets(labels, padded_document_ids(document_ids, attention_mask))
            loss = linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                        self.loss_chunk_tokens, loss_reduction)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = causal_lm_loss(logits, labels, padded_document_ids(document_ids, attention_mask),
                                      reduction=loss_reduction)
        if loss is not None and loss_reduction == "mean" and aux_loss is not None and self.config.moe_balance_alpha:
            loss = loss + self.config.moe_balance_alpha * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, **{CACHE_FIELD: past_key_values})
