"""A literal, independent transcription of the reference HELM-MiCE forward pass (``LorentzDeepSeekV3``).

Source: github.com/Graph-and-Geometric-Learning/helm, ``helm/modules/helm_mice.py`` (model, block, rotary table),
``helm/modules/hmla.py`` (HMLA), ``helm/modules/mice.py`` (gate, curvature experts, sequential folding) and the
HyperCore layers they use (``LorentzLinear``, ``LorentzRMSNorm``, ``LResNet``, ``LorentzFeedForward``,
``Lorentz.lorentzian_centroid``/``cinner``). See REFERENCE-HELM.md section 4.

It is written with plain torch ops against the reference's own state-dict keys and shares no code with helmlm.
Every clamp of the reference is kept where the reference has it (LorentzLinear 1e-8, HFFN hidden lift 1e-6,
RMSNorm/LResNet 1e-4, centroid eps[dtype], no clamp in ``project``), the MoE folds the routed experts one by one in
ascending expert index exactly as ``LorentzMoE.forward`` (top-2 + 1 shared expert), and the gate selects with the
biased scores but weighs with the un-biased ones.

``fp32_islands=True`` reproduces the reference's float32 islands inside a float64 run (rotary tables and rotation
in float32/complex64, HMLA softmax in float32, MiCE softmax gate in float32 with float32 routing weights);
``fp32_islands=False`` is the same math purely in the state dict's dtype (what helmlm computes in float64).
``ulp_jitter`` (a ``torch.Generator``, with ``fp32_islands=True``) moves every non-zero float32 softmax island value
by one ulp in a random direction: the sensitivity probe of test_reference_mice's kernel tolerance.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# The reference's model flags (config/args.py ``model_config`` plus the training flags that shape the model).
REFERENCE_MICE_MODEL_DEFAULTS = {
    "max_seq_len": 2048, "project_emb": False, "vocab_size": 128256,
    "dim": 910, "inter_dim": 3640, "mice_inter_dim": 1820, "n_layers": 16, "n_dense_layers": 1, "n_heads": 14,
    "n_routed_experts": 8, "n_shared_experts": 1, "n_activated_experts": 2, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "train_curv": True, "q_lora_rank": 0,
    "kv_lora_rank": 257, "qk_nope_head_dim": 65, "qk_rope_head_dim": 65, "v_head_dim": 65,
    "original_seq_len": 2048, "rope_theta": 10000, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1,
}


def mice_flags(**overrides) -> dict:
    """The reference defaults with ``overrides``; checks the family this transcription covers."""
    f = {**REFERENCE_MICE_MODEL_DEFAULTS, **overrides}
    if f["n_activated_experts"] != 2 or f["n_shared_experts"] != 1:
        raise ValueError("the reference's MoE folding path exists only for n_activated_experts=2, n_shared_experts=1")
    if f["q_lora_rank"] != 0 or f["max_seq_len"] > f["original_seq_len"]:
        raise ValueError("the reference's low-rank query and YaRN paths crash; not transcribed")
    if (f["qk_rope_head_dim"] - 1) % 2:
        raise ValueError("qk_rope_head_dim - 1 (rotated space dims) must be even")
    return f


# ----------------------------------------------------------------------------------------------- Lorentz helpers


def _lift(space, c, clamp=None):
    """[sqrt(|s|^2 + c), s]; ``clamp`` is the reference's clamp_min on |s|^2 + c (``project`` has none)."""
    sq = (space ** 2).sum(dim=-1, keepdim=True) + c
    if clamp is not None:
        sq = sq.clamp_min(clamp)
    return torch.cat([sq.sqrt(), space], dim=-1)


def _l_inner(x, y):
    """Lorentz inner product <x, y>_L = -x_t y_t + x_s . y_s, keeping the last dim."""
    xy = x * y
    return -xy[..., :1] + xy[..., 1:].sum(dim=-1, keepdim=True)


def _lorentz_normalise(ave, c, eps):
    """sqrt(c) * a / sqrt(max(|<a, a>_L|, eps)) (LResNet and lorentzian_centroid)."""
    return c.sqrt() * ave / (-_l_inner(ave, ave)).abs().clamp_min(eps).sqrt()


def _lresnet(x, y, w_y, scale, c, learned_scale):
    """HyperCore LResNet: normalise x + w*y; then (if scale is truthy) space *= scale (or exp(scale)), time anew."""
    z = _lorentz_normalise(x + y * w_y, c, 1e-4)
    if bool(scale != 0):  # the reference's ``if self.scale:``
        factor = scale.exp() if learned_scale else scale
        z = _lift(factor * z[..., 1:], c, 1e-4)
    return z


def _rms_lift(space, weight, c):
    """LorentzRMSNorm on a space part: rms_norm(eps 1e-8) with gain, then time with clamp 1e-4."""
    return _lift(F.rms_norm(space, (weight.shape[0],), weight, 1e-8), c, 1e-4)


def _hffn(x, p, c):
    """LorentzFeedForward (HFFN): SwiGLU on the full Lorentz input, hidden lift clamp 1e-6, w2 lift clamp 1e-8."""
    u = F.silu(F.linear(x, p("w1.linear.weight"), p("w1.linear.bias")))
    u = u * F.linear(x, p("w3.linear.weight"), p("w3.linear.bias"))
    return _lift(F.linear(_lift(u, c, 1e-6), p("w2.linear.weight"), p("w2.linear.bias")), c, 1e-8)


def _expert(x, p, c, ce):
    """LorentzExpert on curvature ce: move in by sqrt(ce/c), SwiGLU lifted with ce (clamps 1e-8), move out."""
    x = x * (ce / c).sqrt()
    u = F.silu(F.linear(x, p("w1.linear.weight"), p("w1.linear.bias")))
    u = u * F.linear(x, p("w3.linear.weight"), p("w3.linear.bias"))
    o = _lift(F.linear(_lift(u, ce, 1e-8), p("w2.linear.weight"), p("w2.linear.bias")), ce, 1e-8)
    return o * (c / ce).sqrt()


# ------------------------------------------------------------------------------------------------------- rotary


def _rotate(x, base, fp32_islands):
    """Rotate interleaved pairs of ``x (B, N, heads, d)`` by position * base^(-2i/d), positions 0..N-1.

    The reference builds ``freqs_cis`` in float32/complex64 (``1 / base ** (arange(0, d, 2) / d)``, outer with the
    positions, ``polar``) and rotates ``x.float()`` as complex numbers, casting back afterwards.
    """
    d, n = x.shape[-1], x.shape[1]
    real = torch.float32 if fp32_islands else x.dtype
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=real) / d))
    angles = torch.arange(n, dtype=real)[:, None] * inv_freq[None, :]
    table = torch.polar(torch.ones_like(angles), angles)  # (N, d/2) complex
    pairs = torch.view_as_complex(x.to(real).contiguous().view(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(pairs * table[None, :, None, :]).flatten(3).to(x.dtype)


def _jitter(p, gen):
    """``p`` with every non-zero entry moved to the adjacent float (one ulp of ``p``'s dtype), up or down at
    random (``gen``); ``p`` itself when ``gen`` is None."""
    if gen is None:
        return p
    up = torch.randint(0, 2, p.shape, generator=gen).bool()
    toward = torch.where(up, torch.full_like(p, float("inf")), torch.full_like(p, float("-inf")))
    return torch.where(p != 0, torch.nextafter(p, toward), p)


# --------------------------------------------------------------------------------------------------------- HMLA


def _hmla(x, p, f, c, blocked, fp32_islands, ulp_jitter=None):
    """LorentzMLA forward (q_lora_rank = 0) on ``x`` = attn_norm(h) (full Lorentz points, (B, N, D))."""
    b, n, _ = x.shape
    heads, dn, dr = f["n_heads"], f["qk_nope_head_dim"], f["qk_rope_head_dim"]
    dv, r = f["v_head_dim"], f["kv_lora_rank"]
    q = F.linear(x, p("wq.linear.weight"), p("wq.linear.bias")).view(b, n, heads, dn + dr - 1)
    q_nope, q_pe = q[..., :dn], _rotate(q[..., dn:], f["rope_theta"], fp32_islands)
    kv = F.linear(x, p("wkv_a.linear.weight"), p("wkv_a.linear.bias"))
    c_kv, k_pe = kv[..., :r], _rotate(kv[..., r:].unsqueeze(2), f["rope_theta"], fp32_islands)  # one shared rope key
    latent = _rms_lift(c_kv, p("kv_norm.weight"), c)  # (B, N, r + 1)
    kv = F.linear(latent, p("wkv_b.linear.weight"), p("wkv_b.linear.bias")).view(b, n, heads, dn + dv - 1)
    k_nope, v_space = kv[..., :dn], kv[..., dn:]
    q = _lift(torch.cat([q_nope, q_pe], dim=-1), c)
    k = _lift(torch.cat([k_nope, k_pe.expand(b, n, heads, dr - 1)], dim=-1), c)
    v = _lift(v_space, c)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, .)
    q_flipped = torch.cat([-q[..., :1], q[..., 1:]], dim=-1)  # cinner: negate the time coordinate of q
    scores = 2 * c + 2 * (q_flipped @ k.transpose(-1, -2))
    scores = scores / p("softmax_scale") + p("bias")
    scores = scores.masked_fill(blocked[:, None], -1e18)
    if fp32_islands:
        alpha = _jitter(scores.softmax(dim=-1, dtype=torch.float32), ulp_jitter).to(x.dtype)
    else:
        alpha = scores.softmax(dim=-1)
    eps = 1e-8 if v.dtype == torch.float64 else 1e-6  # Lorentz.eps[dtype]
    o = _lorentz_normalise(alpha @ v, c, eps)  # per-head Lorentzian centroid, (B, H, N, dv)
    o = o.transpose(1, 2).reshape(b, n, heads * dv)
    return _lift(F.linear(o, p("wo.linear.weight"), p("wo.linear.bias")), c, 1e-8)


# --------------------------------------------------------------------------------------------------------- MiCE


def _gate(x, p, f, fp32_islands, ulp_jitter=None):
    """Gate on tokens ``x (T, D)``: scores of the space part, biased top-k selection (optionally group-limited),
    weights = un-biased scores of the selected experts (renormalised for sigmoid) * route_scale.
    Returns (weights (T, k) in x's dtype, indices (T, k), un-biased scores (T, E))."""
    logits = F.linear(x[..., 1:], p("gate.weight"))
    if f["score_func"] == "softmax":
        scores = (_jitter(logits.softmax(dim=-1, dtype=torch.float32), ulp_jitter) if fp32_islands
                  else logits.softmax(dim=-1))
    else:
        scores = logits.sigmoid()
    biased = scores + p("gate.bias")  # float32 + float64 -> float64 in the fp32-island run
    groups, t = f["n_expert_groups"], x.shape[0]
    if groups > 1:
        grouped = biased.view(t, groups, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # the reference has a bias: top-2 sum per group
        kept = group_scores.topk(f["n_limited_groups"], dim=-1).indices
        dropped = torch.ones(t, groups, dtype=torch.bool).scatter(1, kept, False)
        biased = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    indices = biased.topk(f["n_activated_experts"], dim=-1).indices
    weights = scores.gather(1, indices)
    if f["score_func"] == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * f["route_scale"]
    return weights.to(x.dtype), indices, scores


def _mice(x, p, f, c, expert_c, fp32_islands, ulp_jitter=None):
    """LorentzMoE forward for top-2 + 1 shared expert: y starts at the origin [sqrt(c), 0] for every token; for
    experts i = 0..E-1 (skipping unused ones) each routed token's y <- LResNet(y, e_i(x), weight=g, scale 2 fixed);
    then out = LResNet(shared(x), y) with a learnable w_y and exp(learnable log-scale)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    weights, indices, scores = _gate(x, p, f, fp32_islands, ulp_jitter)
    y = _lift(torch.zeros_like(x[..., 1:]), c)
    for i in range(f["n_routed_experts"]):
        tok, slot = torch.where(indices == i)
        if tok.numel() == 0:
            continue
        e = _expert(x[tok], lambda k, i=i: p(f"experts.{i}.{k}"), c, expert_c[i])
        y[tok] = _lresnet(y[tok], e, weights[tok, slot, None], torch.tensor(2.0, dtype=x.dtype), c, False)
    z = _hffn(x, lambda k: p(f"shared_experts.{k}"), c)
    out = _lresnet(z, y, p("add_experts.w_y"), p("add_experts.scale"), c, True)
    return out.view(shape), indices, scores


# -------------------------------------------------------------------------------------------------------- model


def reference_mice_forward(sd: dict, flags: dict, input_ids, sequence_id=None, fp32_islands: bool = False,
                           ulp_jitter: torch.Generator | None = None):
    """Reference LorentzDeepSeekV3 forward. ``sd`` has the reference's keys (no ``model.`` prefix), ``flags`` the
    reference's model flags (missing ones take the reference defaults). ``sequence_id`` (B, N) adds train.py's
    document mask (attend only to same-id tokens), OR-ed with the causal mask; rotary positions are not reset.

    Returns ``(logits, moe)``: logits = the head output in the state dict's dtype (the reference returns it
    ``.float()``), and ``moe[layer] = (indices (B*N, k), scores (B*N, E))`` for every MoE layer.
    """
    f = mice_flags(**flags)
    b, n = input_ids.shape
    c_in, c, c_out = sd["manifold_in.k"], sd["manifold_hidden.k"], sd["manifold_out.k"]
    blocked = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None]
    if sequence_id is not None:
        blocked = blocked | (sequence_id[:, :, None] != sequence_id[:, None, :])
    if f["project_emb"]:
        h = _lift(sd["embed.weight"][input_ids], c_in)
    else:
        h = sd["embed.embedding"][input_ids] * (c / c_in).sqrt()
    dim, moe = f["dim"], {}
    for layer in range(f["n_layers"]):
        p = lambda k, layer=layer: sd[f"layers.{layer}.{k}"]  # noqa: E731
        a = _hmla(_rms_lift(h[..., 1:], p("attn_norm.weight"), c), lambda k: p(f"attn.{k}"), f, c, blocked,
                  fp32_islands, ulp_jitter)
        h = _lresnet(h, a, p("attn_res.w_y"), torch.tensor(math.sqrt(dim), dtype=h.dtype), c, False)
        x = _rms_lift(h[..., 1:], p("ffn_norm.weight"), c)
        if layer < f["n_dense_layers"]:
            out = _hffn(x, lambda k: p(f"ffn.{k}"), c)
        else:
            expert_c = [p(f"ffn.experts.{i}.expert_manifold.k") for i in range(f["n_routed_experts"])]
            out, idx, scores = _mice(x, lambda k: p(f"ffn.{k}"), f, c, expert_c, fp32_islands, ulp_jitter)
            moe[layer] = (idx, scores)
        h = _lresnet(h, out, p("ffn_res.w_y"), torch.tensor(math.sqrt(dim), dtype=h.dtype), c, False)
    s = F.linear(h, sd["final_proj.linear.weight"], sd["final_proj.linear.bias"]) * (c_out / c).sqrt()
    h = _rms_lift(s, sd["norm.weight"], c_out)
    return F.linear(h, sd["head.weight"]), moe


# ------------------------------------------------------------------------------------------- random state dicts


def random_reference_mice_state_dict(flags: dict, seed: int = 0, dtype=torch.float64,
                                     expert_curvatures: list[float] | None = None) -> dict:
    """A reference-format HELM-MiCE state dict with random weights for ``flags`` (reference defaults otherwise).

    It has every key the reference's ``LorentzDeepSeekV3.state_dict()`` has, derived from its module tree: the
    weights, the dead ``attn.bias`` and ``embed.add_pos`` scalars, the ``attn_mask`` buffer (``freqs_cis`` is not
    persistent), and each curvature Parameter under all its alias keys (``*.k``/``*.c`` of every module that
    stores the manifold). Large matrices follow the reference's init scales; every small parameter is perturbed:
    linear biases N(0, 0.05), RMSNorm gains 1 + N(0, 0.1), LResNet ``w_y`` U(0.6, 1.4), learnable log-scales
    +U(-0.25, 0.25), attention divisors x U(0.7, 1.3), attention biases U(-0.5, 0.5), gate biases N(0, 0.1),
    expert curvatures distinct in U(0.4, 2.2) (or ``expert_curvatures``). Model-level manifolds stay at c = 1.
    """
    f = mice_flags(**flags)
    g = torch.Generator().manual_seed(seed)
    normal = lambda *s, std=1.0: torch.randn(*s, generator=g, dtype=dtype) * std  # noqa: E731
    uniform = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    scalar = lambda v: torch.tensor(float(v), dtype=dtype)  # noqa: E731
    dim, heads, vocab = f["dim"], f["n_heads"], f["vocab_size"]
    dn, dr, dv, r = f["qk_nope_head_dim"], f["qk_rope_head_dim"], f["v_head_dim"], f["kv_lora_rank"]
    n_exp = f["n_routed_experts"]
    sd: dict[str, torch.Tensor] = {}

    def alias(keys, value):
        for k in keys:
            sd[k] = scalar(value)

    def manifold(prefix, value):  # a registered Lorentz module: its k and the c alias of k
        alias([f"{prefix}.k", f"{prefix}.c"], value)

    def xavier(out_f, in_f, gain):
        bound = gain * math.sqrt(6.0 / (in_f + out_f))
        return uniform(-bound, bound, out_f, in_f)

    def lorentz_linear(prefix, in_f, out_f, c_in=1.0, c_out=None):
        sd[f"{prefix}.linear.weight"] = xavier(out_f, in_f, math.sqrt(2.0))
        sd[f"{prefix}.linear.bias"] = normal(out_f, std=0.05)
        alias([f"{prefix}.c"], c_in)
        manifold(f"{prefix}.manifold", c_in)
        if c_out is not None:
            manifold(f"{prefix}.manifold_out", c_out)

    def rms_norm(prefix, n):
        sd[f"{prefix}.weight"] = 1 + normal(n, std=0.1)
        alias([f"{prefix}.c"], 1.0)
        manifold(f"{prefix}.manifold_in", 1.0)

    def lresnet(prefix, w_y=True, log_scale=None):
        if w_y:
            sd[f"{prefix}.w_y"] = uniform(0.6, 1.4, ())
        if log_scale is not None:
            sd[f"{prefix}.scale"] = log_scale + uniform(-0.25, 0.25, ())
        alias([f"{prefix}.c"], 1.0)
        manifold(f"{prefix}.manifold", 1.0)

    def feed_forward(prefix, inter, c_e=None):
        if c_e is None:  # LorentzFeedForward on the hidden manifold
            alias([f"{prefix}.c"], 1.0)
            manifold(f"{prefix}.manifold", 1.0)
            lorentz_linear(f"{prefix}.w1", dim, inter - 1)
            lorentz_linear(f"{prefix}.w2", inter, dim - 1)
            lorentz_linear(f"{prefix}.w3", dim, inter - 1)
        else:  # LorentzExpert: c/manifold = hidden manifold, expert_manifold = its own curvature
            alias([f"{prefix}.c"], 1.0)
            manifold(f"{prefix}.manifold", 1.0)
            manifold(f"{prefix}.expert_manifold", c_e)
            lorentz_linear(f"{prefix}.w1", dim, inter - 1, c_in=c_e)
            lorentz_linear(f"{prefix}.w2", inter, dim - 1, c_in=c_e, c_out=1.0)
            lorentz_linear(f"{prefix}.w3", dim, inter - 1, c_in=c_e)

    for name in ("manifold_in", "manifold_hidden", "manifold_out"):
        manifold(name, 1.0)
    if f["project_emb"]:
        sd["embed.weight"] = normal(vocab, dim - 1)
    else:
        space = normal(vocab, dim - 1)
        space = space / space.norm(dim=-1, keepdim=True) * math.sinh(1.0) * uniform(0.5, 1.5, vocab, 1)
        sd["embed.embedding"] = _lift(space, 1.0)
        manifold("embed.manifold_in", 1.0)
        manifold("embed.manifold_out", 1.0)
        lresnet("embed.add_pos", log_scale=4.0)  # dead with posit_embed=False, but in the state dict
    if expert_curvatures is None:
        expert_curvatures = [0.4 + 1.8 * (i + float(torch.rand((), generator=g))) / n_exp for i in range(n_exp)]
        order = torch.randperm(n_exp, generator=g).tolist()
        expert_curvatures = [expert_curvatures[j] for j in order]
    for i in range(f["n_layers"]):
        pre = f"layers.{i}"
        manifold(f"{pre}.manifold", 1.0)
        manifold(f"{pre}.attn.manifold", 1.0)
        lorentz_linear(f"{pre}.attn.wq", dim, heads * (dn + dr - 1))
        lorentz_linear(f"{pre}.attn.wkv_a", dim, r + dr - 1)
        rms_norm(f"{pre}.attn.kv_norm", r)
        lorentz_linear(f"{pre}.attn.wkv_b", r + 1, heads * (dn + dv - 1))
        lorentz_linear(f"{pre}.attn.wo", heads * dv, dim - 1)
        sd[f"{pre}.attn.softmax_scale"] = (math.sqrt(heads * (dn + dr)) * uniform(0.7, 1.3, ())).reshape(1)
        sd[f"{pre}.attn.bias"] = uniform(-0.5, 0.5, ())
        if i < f["n_dense_layers"]:
            feed_forward(f"{pre}.ffn", f["inter_dim"])
        else:
            manifold(f"{pre}.ffn.manifold", 1.0)
            sd[f"{pre}.ffn.gate.weight"] = xavier(n_exp, dim - 1, 1.0)
            sd[f"{pre}.ffn.gate.bias"] = normal(n_exp, std=0.1)
            for j in range(n_exp):
                feed_forward(f"{pre}.ffn.experts.{j}", f["mice_inter_dim"], c_e=expert_curvatures[j])
            feed_forward(f"{pre}.ffn.shared_experts", f["n_shared_experts"] * f["mice_inter_dim"])
            lresnet(f"{pre}.ffn.add_experts", log_scale=math.log(2.0))
            lresnet(f"{pre}.ffn.weighted_sum", w_y=False)  # weight=1.0 (a float), fixed scale: only aliases
        rms_norm(f"{pre}.attn_norm", dim - 1)
        rms_norm(f"{pre}.ffn_norm", dim - 1)
        lresnet(f"{pre}.attn_res")
        lresnet(f"{pre}.ffn_res")
    lorentz_linear("final_proj", dim, dim - 1, c_out=1.0)
    rms_norm("norm", dim - 1)
    bound = 1.0 / math.sqrt(dim)  # nn.Linear's default init
    sd["head.weight"] = uniform(-bound, bound, vocab, dim)
    sd["attn_mask"] = torch.ones(f["max_seq_len"], f["max_seq_len"], dtype=torch.bool).triu(1)
    return sd


def balance_gate_biases(sd: dict, flags: dict, input_ids, seed: int = 0, noise: float = 0.01) -> dict:
    """Set each MoE layer's gate bias to ``mean(m) - m + N(0, noise)``, m = the mean un-biased score per expert on
    ``input_ids`` (causal forward, layer by layer since a bias changes the next layers' inputs), as the golden
    fixture does. Random gates are very unbalanced (a few experts take every token); a balancing bias makes every
    expert receive tokens and changes the selected set of many tokens. Returns a new state dict."""
    f = mice_flags(**flags)
    g = torch.Generator().manual_seed(seed)
    sd = dict(sd)
    for layer in range(f["n_dense_layers"], f["n_layers"]):
        _, moe = reference_mice_forward(sd, flags, input_ids)
        m = moe[layer][1].to(sd[f"layers.{layer}.ffn.gate.bias"].dtype).mean(dim=0)
        noise_e = torch.randn(m.shape, generator=g, dtype=m.dtype) * noise
        sd[f"layers.{layer}.ffn.gate.bias"] = m.mean() - m + noise_e
    return sd
