"""A literal, independent transcription of the reference HELM-D forward pass (REFERENCE-HELM.md section 3).

Written against the reference's own state-dict keys and operations (separate Wq/Wk/Wv, N x N scores with the
additive bias and -1e18 masking, centroid with its clamp, LResNet with its clamps, projection-then-norm), sharing
no code with helmlm's layers. Validated on the golden fixture; then it serves as the oracle for other shapes.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _lift(s, c):
    return torch.cat([((s ** 2).sum(-1, keepdim=True) + c).clamp_min(1e-8).sqrt(), s], dim=-1)


def _l_inner(x, y):
    return -x[..., :1] * y[..., :1] + (x[..., 1:] * y[..., 1:]).sum(-1, keepdim=True)


def _rms_norm(x, w, c):
    s = F.rms_norm(x[..., 1:], (w.shape[0],), w, 1e-8)
    return _lift(s, c)


def _lresnet(x, y, w, scale, c):
    ave = x + y * w
    z = math.sqrt(c) * ave / (-_l_inner(ave, ave)).abs().clamp_min(1e-4).sqrt()
    return _lift(scale * z[..., 1:], c)


def _rope(x, n):
    d = x.shape[-1]
    theta = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(n, dtype=torch.float64), theta)
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None]).reshape(x.shape)


def reference_helm_d_logits(sd: dict, arch: tuple[int, int, int], input_ids, sequence_id=None, c: float = 1.0):
    """Logits of the reference LTransformerDecoder for ``arch = (layers, width, heads)``, in the state dict's dtype."""
    layers, width, heads = arch
    d = width // heads
    b, n = input_ids.shape
    blocked = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None]
    if sequence_id is not None:
        blocked = blocked | (sequence_id[:, :, None] != sequence_id[:, None, :])
    h = sd["token_embed.embedding"][input_ids]
    for i in range(layers):
        p = lambda k: sd[f"resblocks.{i}.{k}"]  # noqa: E731
        x = _rms_norm(h, p("ln_1.weight"), c)
        q = F.linear(x, p("attn.Wq.weight"), p("attn.Wq.bias")).view(b, n, heads, d - 1)
        k = F.linear(x, p("attn.Wk.weight"), p("attn.Wk.bias")).view(b, n, heads, d - 1)
        v = F.linear(x, p("attn.Wv.weight"), p("attn.Wv.bias")).view(b, n, heads, d - 1)
        q, k, v = _lift(_rope(q, n), c), _lift(_rope(k, n), c), _lift(v, c)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        qm = torch.cat([-q[..., :1], q[..., 1:]], dim=-1)
        scores = (2 * c + 2 * qm @ k.transpose(-1, -2)) / p("attn.scale") + p("attn.bias")
        scores = scores.masked_fill(blocked[:, None], -1e18).softmax(-1)
        ave = scores @ v
        o = math.sqrt(c) * ave / (-_l_inner(ave, ave)).abs().clamp_min(1e-8).sqrt()
        o = F.linear(o.transpose(1, 2).reshape(b, n, width), p("attn.final_linear.weight"),
                     p("attn.final_linear.bias"))
        h = _lresnet(h, _lift(o, c), p("res1.w_y"), 4 * math.sqrt(width), c)
        x = _rms_norm(h, p("ln_2.weight"), c)
        u = F.silu(F.linear(x, p("mlp.w1.linear.weight"), p("mlp.w1.linear.bias")))
        u = u * F.linear(x, p("mlp.w3.linear.weight"), p("mlp.w3.linear.bias"))
        f = _lift(F.linear(_lift(u, c), p("mlp.w2.linear.weight"), p("mlp.w2.linear.bias")), c)
        h = _lresnet(h, f, p("res2.w_y"), 4 * math.sqrt(width), c)
    h = _lift(F.linear(h, sd["final_proj.linear.weight"], sd["final_proj.linear.bias"]), c)
    h = _rms_norm(h, sd["ln_final.weight"], c)
    return F.linear(h, sd["mapping.weight"])


def random_reference_state_dict(arch: tuple[int, int, int], vocab: int, max_seq_len: int, seed: int = 0,
                                dtype=torch.float64) -> dict:
    """A reference-format HELM-D state dict with random weights (all small parameters perturbed) and the
    reference's buffers and curvature aliases, for shapes the fixture does not cover."""
    layers, width, heads = arch
    d = width // heads
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=dtype) * std)  # noqa: E731
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g, dtype=dtype)  # noqa: E731
    space = r(vocab, width - 1)
    space = space / space.norm(dim=-1, keepdim=True) * math.sinh(1.0)
    sd = {"token_embed.embedding": _lift(space, 1.0), "token_embed.add_pos.w_y": u(0.6, 1.4),
          "token_embed.add_pos.scale": u(3.8, 4.2), "manifold_in.k": torch.tensor(1.0, dtype=dtype),
          "manifold_hidden.k": torch.tensor(1.0, dtype=dtype), "manifold_out.k": torch.tensor(1.0, dtype=dtype),
          "attn_mask": torch.ones(max_seq_len, max_seq_len, dtype=torch.bool).triu(1),
          "freqs_complex": torch.ones(max_seq_len, (d - 1) // 2, dtype=torch.complex64)}
    lin = lambda o, i_: (r(o, i_, std=math.sqrt(2.0 / (o + i_))), r(o, std=0.05))  # noqa: E731
    for i in range(layers):
        pre = f"resblocks.{i}."
        for name, (o, i_) in {"attn.Wq": (heads * (d - 1), width), "attn.Wk": (heads * (d - 1), width),
                              "attn.Wv": (heads * (d - 1), width), "attn.final_linear": (width - 1, width),
                              "mlp.w1.linear": (4 * width - 1, width), "mlp.w3.linear": (4 * width - 1, width),
                              "mlp.w2.linear": (width - 1, 4 * width)}.items():
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = lin(o, i_)
        sd[pre + "attn.scale"] = (math.sqrt(width) * u(0.7, 1.3)).reshape(1)
        sd[pre + "attn.bias"] = u(-0.5, 0.5)
        sd[pre + "ln_1.weight"] = 1 + r(width - 1, std=0.1)
        sd[pre + "ln_2.weight"] = 1 + r(width - 1, std=0.1)
        sd[pre + "res1.w_y"], sd[pre + "res2.w_y"] = u(0.6, 1.4), u(0.6, 1.4)
        sd[pre + "attn.manifold.k"] = torch.tensor(1.0, dtype=dtype)
    sd["final_proj.linear.weight"], sd["final_proj.linear.bias"] = lin(width - 1, width)
    sd["ln_final.weight"] = 1 + r(width - 1, std=0.1)
    sd["mapping.weight"] = r(vocab, width, std=1 / math.sqrt(width))
    return sd
