"""The HELM decoder: one model class whose blocks are assembled from the config's geometry choice.

``HELMForCausalLM`` with ``geometry="lorentz"`` is HELM-D (Lorentz embedding -> blocks of [hyperbolic RMSNorm ->
Lorentz MHA with HoPE -> Lorentzian residual -> hyperbolic RMSNorm -> HFFN -> Lorentzian residual] -> LorentzLinear
-> hyperbolic RMSNorm -> linear head over the full Lorentz vector); with ``geometry="euclidean"`` it is the
LLaMA-style twin (embedding -> pre-norm blocks with RoPE MHA and SwiGLU -> RMSNorm -> head). ``attention="mla"``
and ``ffn="moe"`` swap in HMLA and MiCE (HELM-MiCE), or MLA and MoE for the DeepSeek-style twin.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from helmlm.errors import InputError  # noqa: F401  (re-exported)
from helmlm.models.config import HELMConfig
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
from helmlm.nn.cache import LayerCache, ModelCache


def routing_settings(config: HELMConfig) -> dict[str, Any]:
    """The routed-FFN arguments that MiCE and MoE share, under the config's names."""
    return {"n_routed_experts": config.n_routed_experts, "n_activated_experts": config.n_activated_experts,
            "n_shared_experts": config.n_shared_experts, "score_func": config.score_func,
            "route_scale": config.route_scale, "n_expert_groups": config.n_expert_groups,
            "n_limited_groups": config.n_limited_groups, "dispatch": config.moe_dispatch}


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
                                               c, tau, eps)
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
    supports_gradient_checkpointing = False
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
        """Plain ``nn.Linear``: PyTorch's default (as the reference); embeddings of the twin: N(0, 0.02);
        helmlm layers: their own ``reset_parameters`` (documented on each layer)."""
        if isinstance(module, nn.Embedding):
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
        if config.is_lorentz:
            self.embed = LorentzEmbedding(config.vocab_size, width - 1, c, manifold_table=not config.project_emb)
            self.layers = nn.ModuleList(LorentzBlock(config, i) for i in range(config.num_hidden_layers))
            self.final_proj = LorentzLinear(width, width - 1, curvature=c)
            self.norm = LorentzRMSNorm(width - 1, config.rms_norm_eps, c)
        else:
            self.embed = nn.Embedding(config.vocab_size, width)
            self.layers = nn.ModuleList(EuclideanBlock(config, i) for i in range(config.num_hidden_layers))
            self.final_proj = None
            self.norm = RMSNorm(width, config.rms_norm_eps)
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
        then marks the *new* tokens only (the cache keeps the mask of the old ones) and positions continue from the
        cache length unless ``position_ids`` are given (left-padded prompts pass their own)."""
        past = 0 if cache is None else cache.length
        self.check_inputs(input_ids, document_ids, position_ids, attention_mask, past)
        valid = None if attention_mask is None else attention_mask.bool()
        h = self.embed(input_ids)
        n = input_ids.shape[1]
        if position_ids is None:
            position_ids = (past + torch.arange(n, device=input_ids.device)).unsqueeze(0)
        cos, sin = rotary_tables(position_ids, self.config.rotary_dim, self.config.rope_theta, h.dtype)
        if cache is None:
            document_ids = padded_document_ids(document_ids, attention_mask)
            mask = None if document_ids is None else document_causal_mask(document_ids)
        else:
            if document_ids is not None:
                raise InputError("document_ids cannot be used with a cache; decode one document per row")
            mask = cache.attention_mask(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        caches = [None] * len(self.layers) if cache is None else cache.layers
        for layer, layer_cache in zip(self.layers, caches):
            h = layer(h, cos, sin, mask, valid, layer_cache)
        if self.final_proj is not None:
            return self.norm(self.final_proj(h, return_space=True), space_only=True)
        return self.norm(h)


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


def causal_lm_loss(logits: Tensor, labels: Tensor, document_ids: Tensor | None = None,
                   reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in fp32 over :func:`lm_targets` (``-100`` ignored), averaged (``mean``) or summed
    (``sum``, for token-weighted averaging across micro-batches and ranks)."""
    targets = lm_targets(labels, document_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction=reduction)


# transformers renamed the output field ``past_key_values`` to ``cache`` in its 5.x series and warns whenever the old
# name is written or read; the model writes the field under the name the installed version defines.
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output: MoeCausalLMOutputWithPast) -> ModelCache | None:
    """The KV cache of a forward output, whichever transformers version named the field."""
    return output.get(CACHE_FIELD)


class HELMForCausalLM(HELMPreTrainedModel):
    """A HELM decoder with a linear language-model head (over the full Lorentz vector for ``lorentz``).

    ``forward(input_ids, labels=None, document_ids=None, position_ids=None, attention_mask=None)``:
    ``document_ids`` ``(B, N)`` mark the packed documents of each row, and tokens attend only within their own
    document; ``attention_mask`` marks real tokens (see :meth:`HELMModel.forward`); ``labels`` are the input ids
    (shifted inside, ``-100`` ignored). Returns a ``MoeCausalLMOutputWithPast`` with ``logits``; for models with
    routed layers ``aux_loss``, the sum of their sequence-level balance losses; given labels, ``loss`` =
    cross-entropy + ``moe_balance_alpha * aux_loss``.
    """

    def __init__(self, config: HELMConfig):
        super().__init__(config)
        self.model = HELMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one token adds to the KV cache (all layers, one sequence) in ``dtype`` (default: the model's)."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        return self.config.kv_cache_floats_per_token() * itemsize

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
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values  # transformers 5.x calls it ``cache``
        if use_cache and past_key_values is None:
            past_key_values = ModelCache(len(self.model.layers))
        hidden = self.model(input_ids, document_ids=document_ids, position_ids=position_ids,
                            attention_mask=attention_mask, cache=past_key_values)
        logits = self.lm_head(hidden)
        aux = [layer.aux_loss for _, layer in routed_layers(self.model)]
        aux_loss = torch.stack(aux).sum() if aux else None
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, padded_document_ids(document_ids, attention_mask))
            if aux_loss is not None and self.config.moe_balance_alpha:
                loss = loss + self.config.moe_balance_alpha * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, **{CACHE_FIELD: past_key_values})
