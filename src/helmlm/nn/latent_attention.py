"""HMLA: hyperbolic multi-head latent attention (MATH.md section 4).

Per token: a query ``q_s = W_q x`` split per head into ``q_nope`` (``nope_dim`` coords) and ``q_pe`` (``rope_dim - 1``
coords, rotated by HoPE); ``[c_kv, k_pe] = W_kva x`` with ``k_pe`` one rotary key shared by all heads; the latent point
``c^ = lift(RMSNorm(c_kv))`` (``kv_rank + 1`` ambient coords); per head ``[k_nope, v_s] = W_kvb c^``. Then
``q = lift([q_nope, q_pe])``, ``k = lift([k_nope, k_pe])``, ``v = lift(v_s)`` and hyperbolic attention exactly as in
:mod:`helmlm.nn.attention` (SDPA on the Minkowski form, learnable divisor ``tau``). The heads' output points are
concatenated and mapped by a LorentzLinear.

Each ``*_dim`` counts *ambient* coordinates as in the reference (``qk_head = nope_dim + rope_dim``, one of which is
time). What a compact cache needs per token is ``c_kv`` and ``k_pe`` (and the per-head time scalars of k and v);
:meth:`LorentzLatentAttention.compress` returns exactly that, :meth:`expand` rebuilds k and v from it.

:class:`LatentAttention` is the Euclidean twin (DeepSeek-V2/V3 MLA without query compression): the same structure
with plain linear maps, RMSNorm on the latent, RoPE, and softmax scale ``1 / sqrt(nope + rope)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helmlm.geometry import lift, lift_concat, lorentz_normalize, promote
from helmlm.nn.attention import attend, lorentz_attend, lorentz_query
from helmlm.nn.cache import LayerCache
from helmlm.nn.linear import UNPADDED_ROWS, LorentzLinear
from helmlm.nn.norm import LorentzRMSNorm, RMSNorm
from helmlm.nn.rotary import apply_rotary

MLA_INITS = ("xavier", "linear")  # LorentzLatentAttention's initialisations of its maps (reset_parameters)


class LorentzLatentAttention(nn.Module):
    """Hyperbolic multi-head latent attention (HMLA; see the module docstring) on points of ``ambient`` coords."""

    def __init__(self, ambient: int, heads: int, kv_rank: int, nope_dim: int, rope_dim: int, v_dim: int,
                 curvature: float = 1.0, temperature: float | None = None, eps: float = 1e-8,
                 init: str = "xavier"):
        super().__init__()
        if init not in MLA_INITS:
            raise ValueError(f"init must be one of {MLA_INITS}, got {init!r}")
        self.init = init
        self.ambient, self.heads, self.kv_rank = ambient, heads, kv_rank
        self.nope_dim, self.rope_dim, self.v_dim = nope_dim, rope_dim, v_dim
        self.qk_head = nope_dim + rope_dim  # ambient coords of a query/key point
        self.curvature = curvature
        self.wq = LorentzLinear(ambient, heads * (self.qk_head - 1), curvature=curvature)
        self.wkv_a = LorentzLinear(ambient, kv_rank + rope_dim - 1, curvature=curvature)
        self.kv_norm = LorentzRMSNorm(kv_rank, eps, curvature)
        self.wkv_b = LorentzLinear(kv_rank + 1, heads * (nope_dim + v_dim - 1), curvature=curvature)
        self.wo = LorentzLinear(heads * v_dim, ambient - 1, curvature=curvature)
        self.init_temperature = math.sqrt(heads * self.qk_head) if temperature is None else temperature
        self.temperature = nn.Parameter(torch.tensor(self.init_temperature))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``tau`` at its initial value; with ``init="linear"`` the four maps as ``nn.Linear`` initialises itself
        (weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), as the Lorentz MHA of HELM-D and the twin's MLA
        are; ``"xavier"`` leaves them at :class:`LorentzLinear`'s own (the reference's Xavier, gain sqrt(2))."""
        nn.init.constant_(self.temperature, self.init_temperature)
        if self.init == "linear":
            for linear in (self.wq, self.wkv_a, self.wkv_b, self.wo):
                nn.Linear.reset_parameters(linear)

    def compress(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """What a latent cache stores per token: ``c_kv`` (``kv_rank``) and the rotated ``k_pe`` (``rope_dim - 1``)."""
        c_kv, k_pe = self.wkv_a(x, return_space=True).split([self.kv_rank, self.rope_dim - 1], dim=-1)
        return c_kv, apply_rotary(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)

    def expand(self, c_kv: Tensor, k_pe: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values (Lorentz points, ``(B, N, H, qk_head)`` and ``(B, N, H, v_dim)``) from the latent;
        ``width``: both zero-padded to that many coordinates (the attention kernel's one head dim)."""
        kv = self.wkv_b(self.kv_norm(c_kv, space_only=True), return_space=True)
        k_nope, v = kv.unflatten(-1, (self.heads, -1)).split([self.nope_dim, self.v_dim - 1], dim=-1)
        k_pe = k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], -1)
        return lift_concat([k_nope, k_pe], self.curvature, width), lift_concat([v], self.curvature, width)

    def query_space(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The queries' space parts ``[q_nope, q_pe]`` (``(B, N, H, qk_head - 1)``, ``q_pe`` rotated)."""
        q = self.wq(x, return_space=True).unflatten(-1, (self.heads, self.qk_head - 1))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim - 1], dim=-1)
        return torch.cat([q_nope, apply_rotary(q_pe, cos, sin)], dim=-1)

    def query(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The queries as Lorentz points (``(B, N, H, qk_head)``)."""
        return lift(self.query_space(x, cos, sin), self.curvature)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        """With a ``cache``, attention runs absorbed in latent space (:meth:`forward_absorbed`)."""
        if cache is not None:
            return self.forward_absorbed(x, cos, sin, mask, cache)
        # Fused kernels want one head dim for q, k and v: zero-pad the shorter side. Exact: zero coordinates add
        # nothing to q~.k, and the zero coordinates of v give zero output coordinates, which are dropped.
        head = max(self.qk_head, self.v_dim)
        q = pad_to(lorentz_query(self.query_space(x, cos, sin), self.curvature, self.temperature), head)
        k, v = self.expand(*self.compress(x, cos, sin), width=head)
        o = lorentz_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.curvature, mask,
                           value_dim=self.v_dim)
        return self.wo(o.transpose(1, 2).flatten(-2))

    def forward_absorbed(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                         cache: LayerCache) -> Tensor:
        """Attention over the compact latent cache (MATH.md section 4), exact.

        Per token the cache holds the latent point ``c^`` (``kv_rank + 1``), the rotary key ``k_pe`` and, per head,
        the time coordinates ``k_t`` and ``v_t``: ``kv_rank + rope_dim + 2 H`` numbers. With ``W_kn, b_kn, W_v, b_v``
        the per-head blocks of ``wkv_b``, ``q~.k = -q_t k_t + (W_kn^T q_nope).c^ + q_pe.k_pe + q_nope.b_kn``, whose
        last term is the same for every key and cancels in the softmax; and ``sum_j a_j v_j`` has time
        ``sum_j a_j v_t,j`` and space ``W_v (sum_j a_j c^_j) + b_v``. So one SDPA over ``[k_t, c^, k_pe]`` keys and
        ``[v_t, c^]`` values gives the heads' centroids, which are then projected and normalised.
        """
        heads, r1, n_nope = self.heads, self.kv_rank + 1, self.nope_dim
        c_kv, k_pe = self.compress(x, cos, sin)
        latent = self.kv_norm(c_kv, space_only=True)  # c^, (B, N, kv_rank + 1)
        k_nope, v_s = self.wkv_b(latent, return_space=True).unflatten(-1, (heads, -1)).split(
            [n_nope, self.v_dim - 1], dim=-1)
        k_t = lift(torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], -1)], dim=-1),
                   self.curvature)[..., 0]
        v_t = lift(v_s, self.curvature)[..., 0]
        latent, k_pe, k_t, v_t = cache.append(latent, k_pe, k_t, v_t)  # everything cached so far: (B, T, ...)

        weight = self.wkv_b.weight.view(heads, -1, r1)
        bias = self.wkv_b.bias.view(heads, -1)
        q = self.query(x, cos, sin)  # (B, N, H, qk_head) = [q_t, q_nope, q_pe]
        with torch.autocast(x.device.type, enabled=False):
            q, latent, k_pe, k_t, v_t = (promote(t) for t in (q, latent, k_pe, k_t, v_t))
            w_kn, w_v = weight[:, :n_nope].to(q.dtype), weight[:, n_nope:].to(q.dtype)
            q_abs = torch.einsum("bnhd,hdr->bnhr", q[..., 1 : 1 + n_nope], w_kn)
            scale = 2.0 / self.temperature.to(q.dtype)
            query = torch.cat([-q[..., :1], q_abs, q[..., 1 + n_nope :]], dim=-1).transpose(1, 2) * scale
            if mask is not None and query.shape[-2] <= UNPADDED_ROWS:
                mixed = _latent_attention_few_queries(query, latent, k_pe, k_t, v_t, mask)
            else:
                keys = torch.cat([k_t.unsqueeze(-1), latent.unsqueeze(2).expand(-1, -1, heads, -1),
                                  k_pe.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1).transpose(1, 2)
                values = torch.cat([v_t.unsqueeze(-1), latent.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1)
                values = pad_to(values, query.shape[-1]).transpose(1, 2)
                mixed = attend(query, keys, values, mask, scale=1.0)[..., : 1 + r1]  # (B, H, N, 1 + kv_rank + 1)
            space = torch.einsum("bhnr,hvr->bhnv", mixed[..., 1:], w_v) + bias[:, n_nope:].to(q.dtype)[:, None]
            o = lorentz_normalize(torch.cat([mixed[..., :1], space], dim=-1), self.curvature)
        return self.wo(o.transpose(1, 2).flatten(-2))


def _latent_attention_few_queries(query: Tensor, latent: Tensor, k_pe: Tensor, k_t: Tensor, v_t: Tensor,
                                  mask: Tensor) -> Tensor:
    """The SDPA of :meth:`LorentzLatentAttention.forward_absorbed` for a few queries (decoding steps), without the
    per-head keys ``[k_t, c^, k_pe]`` and values ``[v_t, c^]`` that SDPA needs materialised over the whole cache
    on every step: the shared latent and rotary key enter through one batched matmul each, the per-head times as a
    broadcast product. ``query (B, H, N, 1 + r1 + rope)`` (already ``q~`` times ``2 / tau``), ``latent (B, T, r1)``,
    ``k_pe (B, T, rope)``, ``k_t, v_t (B, T, H)``, ``mask (B, 1, N, T)``; returns ``(B, H, N, 1 + r1)``."""
    h, n = query.shape[1:3]
    r1 = latent.shape[-1]
    q_t, q_lat, q_pe = query.split([1, r1, query.shape[-1] - 1 - r1], dim=-1)
    scores = torch.baddbmm((q_t * k_t.transpose(1, 2).unsqueeze(2)).flatten(1, 2), q_lat.flatten(1, 2),
                           latent.transpose(1, 2))  # (B, H N, T)
    scores = scores.baddbmm_(q_pe.flatten(1, 2), k_pe.transpose(1, 2)).unflatten(1, (h, n))
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, H, N, T)
    time = (weights @ v_t.transpose(1, 2).unsqueeze(-1))  # (B, H, N, 1)
    space = (weights.flatten(1, 2) @ latent).unflatten(1, (h, n))  # (B, H, N, r1)
    return torch.cat([time, space], dim=-1)


def pad_to(x: Tensor, width: int) -> Tensor:
    """``x`` zero-padded on its last axis to ``width``; ``x`` itself when it has that width (``F.pad`` would copy)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


class LatentAttention(nn.Module):
    """Euclidean multi-head latent attention (the DeepSeek-style twin of :class:`LorentzLatentAttention`).

    ``q = W_q x`` per head ``[q_nope (nope_dim), q_pe (rope_dim)]``; ``[c_kv, k_pe] = W_kva x``; per head
    ``[k_nope, v] = W_kvb RMSNorm(c_kv)``; RoPE on ``q_pe`` and the shared ``k_pe``; SDPA; ``W_o``. No biases.
    Dims count features (no time coordinate). :meth:`compress`/:meth:`expand` mirror the hyperbolic layer's.
    """

    def __init__(self, dim: int, heads: int, kv_rank: int, nope_dim: int, rope_dim: int, v_dim: int,
                 eps: float = 1e-8):
        super().__init__()
        self.dim, self.heads, self.kv_rank = dim, heads, kv_rank
        self.nope_dim, self.rope_dim, self.v_dim = nope_dim, rope_dim, v_dim
        self.qk_head = nope_dim + rope_dim
        self.wq = nn.Linear(dim, heads * self.qk_head, bias=False)
        self.wkv_a = nn.Linear(dim, kv_rank + rope_dim, bias=False)
        self.kv_norm = RMSNorm(kv_rank, eps)
        self.wkv_b = nn.Linear(kv_rank, heads * (nope_dim + v_dim), bias=False)
        self.wo = nn.Linear(heads * v_dim, dim, bias=False)

    def compress(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return c_kv, apply_rotary(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)

    def expand(self, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.wkv_b(self.kv_norm(c_kv).to(c_kv.dtype))
        k_nope, v = kv.unflatten(-1, (self.heads, -1)).split([self.nope_dim, self.v_dim], dim=-1)
        k_pe = k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], -1)
        return torch.cat([k_nope, k_pe], dim=-1), v

    def query(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q_nope, q_pe = self.wq(x).unflatten(-1, (self.heads, self.qk_head)).split([self.nope_dim, self.rope_dim], -1)
        return torch.cat([q_nope, apply_rotary(q_pe, cos, sin)], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        q = self.query(x, cos, sin)
        latent = self.compress(x, cos, sin)
        k, v = self.expand(*(cache.append(*latent) if cache is not None else latent))
        head = max(self.qk_head, self.v_dim)  # one head dim for fused kernels; zero padding is exact
        q, k, v = (pad_to(t, head) for t in (q, k, v.to(q.dtype)))
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                   scale=1.0 / math.sqrt(self.qk_head))[..., : self.v_dim]
        return self.wo(o.transpose(1, 2).flatten(-2))
