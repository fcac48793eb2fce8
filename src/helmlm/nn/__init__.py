"""Hyperbolic (Lorentz) layers and their Euclidean twins."""

from helmlm.nn.attention import (
    LorentzSelfAttention,
    SelfAttention,
    attend,
    document_causal_mask,
    lorentz_sdpa,
    naive_lorentz_attention,
)
from helmlm.nn.embedding import LorentzEmbedding
from helmlm.nn.ffn import LorentzFeedForward, SwiGLU
from helmlm.nn.latent_attention import LatentAttention, LorentzLatentAttention
from helmlm.nn.linear import GEMM_ALIGN, LorentzLinear, aligned_linear, gemm_pad, lorentz_init_
from helmlm.nn.mice import LorentzExperts, MiCE
from helmlm.nn.moe import Experts, MoE
from helmlm.nn.norm import LorentzRMSNorm, RMSNorm
from helmlm.nn.residual import LorentzResidual
from helmlm.nn.rotary import apply_rotary, rotary_tables
from helmlm.nn.routing import (
    Gate,
    RoutedFFN,
    balance_step,
    routed_layers,
    routing_stats,
    sequence_balance_loss,
    update_balance_bias,
)

__all__ = [
    "Experts",
    "Gate",
    "LatentAttention",
    "MoE",
    "RoutedFFN",
    "balance_step",
    "routed_layers",
    "routing_stats",
    "sequence_balance_loss",
    "update_balance_bias",
    "LorentzEmbedding",
    "LorentzExperts",
    "LorentzLatentAttention",
    "MiCE",
    "aligned_linear",
    "attend",
    "GEMM_ALIGN",
    "gemm_pad",
    "lorentz_init_",
    "LorentzFeedForward",
    "LorentzLinear",
    "LorentzRMSNorm",
    "LorentzResidual",
    "LorentzSelfAttention",
    "RMSNorm",
    "SelfAttention",
    "SwiGLU",
    "apply_rotary",
    "document_causal_mask",
    "lorentz_sdpa",
    "naive_lorentz_attention",
    "rotary_tables",
]
