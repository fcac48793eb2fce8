"""Memory and speed options (issue 16) compute what the plain path computes: the chunked linear cross-entropy, the
model's summed loss, per-block activation checkpointing, and blocks that ``torch.compile`` traces without a graph
break."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helmlm.models import HELMConfig, HELMForCausalLM
from helmlm.nn.loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_equals_the_full_logits_loss(chunk, reduction):
    """fp64, against F.cross_entropy on the full logits: value and gradients (hidden and weight), with ignored
    targets and a chunk that does not divide the tokens."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(53, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(31, 12, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 31, (53,), generator=g)
    targets[::5] = -100
    upstream = torch.tensor(1.7, dtype=torch.float64)  # a non-unit incoming gradient
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction=reduction)
    want = torch.autograd.grad(expected * upstream, (hidden, weight))
    got_loss = linear_cross_entropy(hidden, weight, targets, chunk, reduction)
    got = torch.autograd.grad(got_loss * upstream, (hidden, weight))
    torch.testing.assert_close(got_loss, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_under_bf16_autocast():
    """Under CPU bf16 autocast the head's products run in bf16 (as the plain head's would) and the softmax and the
    weight's gradient accumulate in fp32: loss and gradients match the plain head under autocast to bf16's
    rounding, and the gradients come back in the parameters' dtype."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(24, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 24, (40,), generator=g)
    targets[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)
        got_loss = linear_cross_entropy(hidden, weight, targets, 16)
    want = torch.autograd.grad(expected, (hidden, weight))
    got = torch.autograd.grad(got_loss, (hidden, weight))
    assert got_loss.dtype == torch.float32
    torch.testing.assert_close(got_loss, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_linear_cross_entropy_all_ignored_and_bad_arguments():
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((4,), -100), 2)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.long), 2, "none")
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.long), 0)


def tiny(kind: str, **kw) -> HELMForCausalLM:
    torch.manual_seed(0)
    fields = {"vocab_size": 97, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64}
    fields.update({"helm_d": {"hidden_size": 34}, "llama": {"hidden_size": 32, "geometry": "euclidean"},
                   "helm_mice": {"hidden_size": 34, "attention": "mla", "ffn": "moe", "kv_lora_rank": 8,
                                 "qk_nope_head_dim": 9, "qk_rope_head_dim": 9, "v_head_dim": 9,
                                 "moe_intermediate_size": 24, "n_dense_layers": 1},
                   "deepseek": {"hidden_size": 32, "geometry": "euclidean", "attention": "mla", "ffn": "moe",
                                "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
                                "moe_intermediate_size": 24, "n_dense_layers": 1}}[kind])
    fields.update(kw)
    return HELMForCausalLM(HELMConfig(**fields)).double()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    docs = torch.tensor([[0] * 8 + [1] * 12, [0] * 20, [0] * 5 + [1] * 5 + [2] * 10])
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return ids, docs, mask


def loss_and_grads(model, **kw):
    ids, docs, mask = batch()
    model.zero_grad()
    out = model(ids, labels=ids, document_ids=docs, attention_mask=mask, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["helm_d", "llama", "helm_mice"])
def test_chunked_loss_and_checkpointed_blocks_equal_the_plain_model(kind):
    """The same loss and gradients (fp64) with the loss over 7-token chunks (no logits returned), with every block
    recomputed in backward, and both; ``loss_reduction='sum'`` is the mean times the number of targets."""
    model = tiny(kind).train()
    plain, want = loss_and_grads(model)
    summed, _ = loss_and_grads(model, loss_reduction="sum")
    ids, docs, mask = batch()
    from helmlm.models.modeling import lm_targets, padded_document_ids

    n_targets = int((lm_targets(ids, padded_document_ids(docs, mask)) != -100).sum())
    aux = 0.0 if plain.aux_loss is None else model.config.moe_balance_alpha * plain.aux_loss
    torch.testing.assert_close(summed.loss.double(), (plain.loss - aux).double() * n_targets, rtol=1e-6, atol=0)
    for chunk, checkpointing in ((7, False), (0, True), (7, True)):
        model.loss_chunk_tokens = chunk
        model.model.gradient_checkpointing = checkpointing
        out, got = loss_and_grads(model)
        assert (out.logits is None) == (chunk > 0)
        # the plain loss takes fp32 logits (causal_lm_loss), the chunked one fp64 for this fp64 model
        tol = {"rtol": 1e-5, "atol": 1e-8} if chunk else {"rtol": 1e-12, "atol": 1e-14}
        torch.testing.assert_close(out.loss.double(), plain.loss.double(), **tol)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], **tol, msg=name)


def test_transformers_activation_checkpointing_switch_reaches_the_blocks():
    model = tiny("helm_d").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.model.gradient_checkpointing
    recomputed = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: recomputed.append(1))
    ids, docs, mask = batch()
    model(ids, labels=ids).loss.backward()
    assert len(recomputed) == 2  # once in forward, once more in backward


def test_trainer_options_train_like_the_plain_run(tmp_path):
    """A run with the chunked loss and checkpointed blocks logs the same losses as the plain run (fp32: to 1e-5)."""
    import json

    from test_train import corpus, overrides  # noqa: F401

    from helmlm.config import load_train_config
    from helmlm.training.trainer import train

    rng = torch.Generator().manual_seed(0)
    words = "the of and to in a is that it was for on are as with his they at be this from have".split()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, len(words), (40,),
                                                                                                 generator=rng))})
                            + "\n" for _ in range(60)))
    losses = []
    for name, extra in (("plain", []), ("options", ["train.loss_chunk_tokens=16",
                                                    "train.activation_checkpointing=true"])):
        train(load_train_config(None, overrides(data, tmp_path / name, "train.steps=4", "eval.every=4", *extra)))
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if r["kind"] == "train"])
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("kind", ["helm_d", "llama", "helm_mice", "deepseek"])
def test_blocks_compile_without_graph_breaks(kind):
    """``train.compile`` compiles each block: dynamo traces a whole block (the training call: no cache, a document
    mask, padding) as one graph."""
    model = tiny(kind).float().train()  # routed layers at dispatch "auto": the grouped kernel, as a custom op
    captured = {}

    def grab(module, args):
        captured.setdefault("args", args)

    block = model.model.layers[-1]
    handle = block.register_forward_pre_hook(grab)
    ids, docs, mask = batch()
    model(ids, document_ids=docs, attention_mask=mask)
    handle.remove()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(*captured["args"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["helm_d", "helm_mice", "deepseek"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(kind):
    """``train.compile``'s per-block ``compile()`` (inductor, a C++ compiler on CPU): the same loss and gradients as
    eager, fp32, to rounding."""
    model = tiny(kind).float().train()
    plain, want = loss_and_grads(model)
    model.model.compile_blocks()
    out, got = loss_and_grads(model)
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# fused elementwise paths: each equals the autograd graph of its formula (fp64), gradients included
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["documents", "interleaved"])
@pytest.mark.parametrize("n", [300, 512, 700])
def test_masked_attention_per_document_or_in_query_blocks_equals_one_call(n, layout):
    """``attend`` with a mask longer than QUERY_BLOCK: packed contiguous documents run one causal call per document
    and row, other masks (documents interleaved) in query blocks over the allowed key span; output and gradients
    equal one SDPA call on the whole mask (fp64), for lengths that are and are not multiples of the block."""
    from helmlm.nn.attention import QUERY_BLOCK, attend, document_causal_mask, document_segments

    assert n > QUERY_BLOCK
    g = torch.Generator().manual_seed(n)
    if layout == "documents":
        starts = torch.zeros(3, n, dtype=torch.long)
        starts.scatter_(1, torch.rand(3, n, generator=g).argsort(-1)[:, :4], 1)
        starts[:, 0] = 0
        mask = document_causal_mask(starts.cumsum(-1))
        bounds = document_segments(mask)
        assert [b[1:-1] for b in bounds] == [row.nonzero().flatten().tolist() for row in starts]
    else:
        mask = document_causal_mask(torch.randint(0, 3, (3, n), generator=g))
        assert document_segments(mask) is None
    q, k, v = (torch.randn(3, 2, n, 9, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    upstream = torch.randn(3, 2, n, 9, dtype=torch.float64, generator=g)
    got = attend(q, k, v, mask, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), upstream), torch.autograd.grad(want, (q, k, v), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_document_segments_refuses_what_is_not_contiguous_documents():
    """Refused: too many documents per row (padding makes each pad token a document), a mask edited in place after
    its segments were found (the kept answer is dropped), a mask without the head axis. One document per row is
    one segment."""
    from helmlm.nn.attention import MAX_SEGMENTS, document_causal_mask, document_segments

    n = 300
    assert document_segments(document_causal_mask(torch.arange(n).unsqueeze(0))) is None  # n one-token documents
    ids = torch.zeros(2, n, dtype=torch.long)
    ids[:, n - MAX_SEGMENTS:] = torch.arange(1, MAX_SEGMENTS + 1)  # 1 + MAX_SEGMENTS documents
    assert document_segments(document_causal_mask(ids)) is None
    mask = document_causal_mask(torch.zeros(2, n, dtype=torch.long))
    assert document_segments(mask) == [[0, n], [0, n]]
    ids = torch.tensor([0] * 100 + [1] * 150 + [2] * 50).expand(2, -1)
    found = document_segments(document_causal_mask(ids).clone())  # a mask without the ids' answer: the O(N^2) check
    assert found == document_segments(document_causal_mask(ids)) == [[0, 100, 250, n]] * 2
    mask[1, 0, 200, :100] = False  # now row 1 is not one causal document, nor contiguous documents
    assert document_segments(mask) is None
    assert document_segments(mask.squeeze(1)) is None  # not (B, 1, N, N)


def test_scaled_residual_matches_its_formula_and_gradcheck():
    """The fused scaled residual equals ``lift(scale sqrt(c) a_s / sqrt|<a,a>_L|)``, ``a = x + w y``, built from plain
    ops, in value and in every gradient (x, y, learnable weight, per-token weight, learnable log-scale), and
    passes gradcheck."""
    from torch.autograd import gradcheck

    from helmlm.geometry import lift, minkowski_inner
    from helmlm.nn import LorentzResidual
    from helmlm.nn.residual import _ScaledResidual

    g = torch.Generator().manual_seed(0)
    c = torch.tensor(2.0, dtype=torch.float64)
    x = lift(3 * torch.randn(2, 5, 7, dtype=torch.float64, generator=g), c).requires_grad_()
    y = lift(torch.randn(2, 5, 7, dtype=torch.float64, generator=g), c).requires_grad_()
    per_token = (torch.rand(2, 5, 1, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    for module in (LorentzResidual(scale=5.0, curvature=2.0), LorentzResidual(scale=5.0, learn_scale=True,
                                                                              curvature=2.0)):
        module = module.double()
        for weight in (None, per_token):
            w = module.weight if weight is None else weight
            scale = module.log_scale.exp() if module.log_scale is not None else 5.0
            a = x + w * y
            want = lift(a[..., 1:] * (scale * c.sqrt() / minkowski_inner(a, a, keepdim=True).abs().sqrt()), c,
                        accurate=True)
            got = module(x, y, weight=weight)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            upstream = torch.randn(got.shape, dtype=torch.float64, generator=g)
            inputs = [x, y, w] + ([module.log_scale] if module.log_scale is not None else [])
            for a_, b_ in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
                torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-12)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda *t: _ScaledResidual.apply(*t, c, 1e-8), (x, y, per_token, scale))


def test_time_from_space_gradient_is_autograds():
    """``time_from_space`` (one-pass backward) passes gradcheck in the space part and in a scalar, per-row or
    per-axis curvature."""
    from torch.autograd import gradcheck

    from helmlm.geometry import time_from_space

    g = torch.Generator().manual_seed(0)
    space = torch.randn(4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    for c in (torch.tensor(1.5, dtype=torch.float64), torch.rand(4, 1, 1, dtype=torch.float64, generator=g) + 0.5,
              torch.rand(3, 1, dtype=torch.float64, generator=g) + 0.5):
        assert gradcheck(time_from_space, (space, c.requires_grad_()))


def test_causal_lm_loss_shifts_targets_not_logits():
    """The loss over (B, N) logits with shifted targets equals cross-entropy on the sliced logits (fp64), with a
    document boundary and an ignored label."""
    from helmlm.models import causal_lm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 9), generator=g)
    labels[0, 4] = -100
    docs = torch.tensor([[0] * 5 + [1] * 4, [0] * 9])
    targets = labels[:, 1:].masked_fill(docs[:, 1:] != docs[:, :-1], -100)
    for reduction in ("mean", "sum"):
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction=reduction)
        got = causal_lm_loss(logits, labels, docs, reduction=reduction)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0])


@pytest.mark.parametrize("layout", ["hffn", "experts"])
def test_swiglu_lift_matches_its_formula_and_gradcheck(layout):
    """``swiglu_lift``, the lifted SwiGLU hidden point built in one buffer, in fp64 against the plain formula: the
    HFFN's layout ``[0, t, u]`` (time in the last front-padding column, a scalar curvature) and the MiCE experts'
    ``[u, t, 1, 0]`` (per-row curvatures); values and gradients in ``g``, ``v`` and the curvature, the padding's
    gradients 0; the recorded and the plain (no-grad) paths agree."""
    from torch.autograd import gradcheck

    from helmlm.nn.ffn import _SwiGLULift, swiglu_lift

    gen = torch.Generator().manual_seed(0)
    rows, h, width = 7, 5, 8
    real = slice(width - h, width) if layout == "hffn" else slice(0, h)
    time_col, ones_col = (width - h - 1, None) if layout == "hffn" else (h, h + 1)
    mask = torch.zeros(width, dtype=torch.float64)
    mask[real] = 1
    g, v = (torch.randn(rows, width, dtype=torch.float64, generator=gen).mul(mask).requires_grad_() for _ in range(2))
    c = (torch.rand(rows, 1, dtype=torch.float64, generator=gen) + 0.3 if layout == "experts"
         else torch.tensor(0.7, dtype=torch.float64)).requires_grad_()

    u = F.silu(g[:, real]) * v[:, real]
    time = (u.square().sum(-1, keepdim=True) + c).sqrt()
    parts = [time, u] if layout == "hffn" else [u, time, torch.ones_like(time)]
    want = F.pad(torch.cat(parts, -1), (width - h - 1, 0) if layout == "hffn" else (0, width - h - 2))
    got = swiglu_lift(g, v, c, time_col, ones_col)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(swiglu_lift(g, v, c, time_col, ones_col), want, rtol=1e-14, atol=1e-14)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    got_grads = torch.autograd.grad(got, (g, v, c), upstream)
    for a, b in zip(got_grads, torch.autograd.grad(want, (g, v, c), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert got_grads[0].mul(1 - mask).abs().max() == 0 and got_grads[1].mul(1 - mask).abs().max() == 0
    # gradcheck perturbs the padding too, where the layout's zeros no longer hold: check the real columns only
    assert gradcheck(lambda a, b, cc: _SwiGLULift.apply(a * mask, b * mask, cc, time_col, ones_col), (g, v, c))


def test_lorentz_query_is_the_lifted_scaled_query_in_one_node():
    """``lorentz_query`` (attention's ``q~ = (2 / tau) (-q_t, q_s)`` of ``q = lift(space)``) against the plain ops:
    fp64 values and gradients in the space part, a learned curvature and the temperature, gradcheck; in fp32 the
    recorded path gives the plain path's bits (so cached decoding, which records nothing, sees the same queries);
    the node keeps one tensor of the query's size, not two."""
    from torch.autograd import gradcheck

    from helmlm.geometry import lift, minkowski_sign
    from helmlm.nn.attention import _LorentzQuery, lorentz_query

    gen = torch.Generator().manual_seed(0)
    space = torch.randn(2, 5, 3, 6, dtype=torch.float64, generator=gen).mul(4).requires_grad_()
    c = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def plain(s_, c_, tau_):
        q = lift(s_, c_)
        return q * (minkowski_sign(q) * (2.0 / tau_))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        got = lorentz_query(space, c, tau)
    assert got.grad_fn.name().startswith("_LorentzQuery") and saved.count(got.numel()) == 1
    want = plain(space, c, tau)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, (space, c, tau), upstream),
                    torch.autograd.grad(want, (space, c, tau), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert gradcheck(lambda s_, c_, a: _LorentzQuery.apply(s_, c_, a, None, None), (space, c, 2.0 / tau))
    space32 = space.detach().float().requires_grad_()
    recorded = lorentz_query(space32, 0.6, tau.detach().float())
    with torch.no_grad():
        assert torch.equal(recorded, lorentz_query(space32, 0.6, tau.detach().float()))
        assert torch.equal(recorded, plain(space32, 0.6, tau.detach().float()))


@pytest.mark.parametrize("batch_tables", [False, True])
def test_hope_query_and_keys_rotate_inside_their_nodes(batch_tables):
    """HoPE folded into the query and key nodes (``lorentz_query(..., rotary=)``, ``hope_lift``) against the plain
    ops ``lift(apply_rotary(.))``: fp64 values and gradients (space, learned curvature, temperature), gradcheck, one
    saved tensor of the output's size; the same with per-row tables (packed documents restart positions); and in
    fp32 without recorded gradients (decoding, compiled graphs) the plain path itself."""
    from torch.autograd import gradcheck

    from helmlm.geometry import lift, minkowski_sign
    from helmlm.nn.attention import hope_lift, lorentz_query
    from helmlm.nn.rotary import apply_rotary, rotary_tables

    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 50, (2, 5), generator=gen) if batch_tables else torch.arange(5).unsqueeze(0)
    cos, sin = rotary_tables(positions, 6, 10000.0, torch.float64)
    space = torch.randn(2, 5, 3, 6, dtype=torch.float64, generator=gen).mul(4).requires_grad_()
    c = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def plain_query(s_, c_, tau_):
        q = lift(apply_rotary(s_, cos, sin), c_)
        return q * (minkowski_sign(q) * (2.0 / tau_))

    cases = [(lambda s_, c_, tau_: lorentz_query(s_, c_, tau_, rotary=(cos, sin)), plain_query, (space, c, tau)),
             (lambda s_, c_: hope_lift(s_, cos, sin, c_), lambda s_, c_: lift(apply_rotary(s_, cos, sin), c_),
              (space, c))]
    for (fused, plain, inputs), node in zip(cases, ("_LorentzQuery", "_HoPELift")):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            got = fused(*inputs)
        want = plain(*inputs)
        assert got.grad_fn.name().startswith(node) and saved.count(got.numel()) == 1
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
        upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
        for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert gradcheck(fused, inputs)
    cos, sin = rotary_tables(positions, 6, 10000.0, torch.float32)  # the tables in the model's dtype, as in use
    space32, tau32 = space.detach().float(), tau.detach().float()
    with torch.no_grad():
        assert torch.equal(lorentz_query(space32, 0.6, tau32, rotary=(cos, sin)), plain_query(space32, 0.6, tau32))
        assert torch.equal(hope_lift(space32, cos, sin, 0.6), lift(apply_rotary(space32, cos, sin), 0.6))


@pytest.mark.parametrize("block_rows", [5, 2048])
def test_swiglu_ffn_matches_the_plain_products_and_keeps_no_hidden_point(monkeypatch, block_rows):
    """The HFFN's three products around ``swiglu_lift`` as one autograd node working in blocks of tokens (5: three
    blocks, the last one short; 2048: one), in fp64 against the plain ops: values and every gradient (input, the
    three weights and biases, the curvature) agree, gradcheck passes, and the node keeps ``x``, ``g`` and ``v`` but
    no hidden point; an fp32 HFFN goes through it and matches the plain graph; the no-grad path gives the same
    values."""
    from torch.autograd import gradcheck

    from helmlm.nn import ffn
    from helmlm.nn.ffn import LorentzFeedForward, _SwiGLUFFN, swiglu_ffn, swiglu_lift

    monkeypatch.setattr(ffn, "FFN_CHUNK_ROWS", block_rows)
    gen = torch.Generator().manual_seed(0)
    dim, width, h, out = 4, 8, 5, 3
    time_col = width - h - 1
    mask = torch.zeros(width, 1, dtype=torch.float64)
    mask[width - h:] = 1

    def param(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    x, w2, b2 = param(2, 6, dim), param(out, width), param(out)
    w1, w3 = (param(width, dim).mul(mask).detach().requires_grad_() for _ in range(2))  # zero rows: the padding
    b1, b3 = (param(width).mul(mask[:, 0]).detach().requires_grad_() for _ in range(2))
    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    inputs = (x, w1, b1, w3, b3, w2, b2, c)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        got = swiglu_ffn(*inputs, time_col)
    assert got.grad_fn.name().startswith("_SwiGLUFFN") and saved.count(torch.Size([12, width])) == 2
    want = F.linear(swiglu_lift(F.linear(x, w1, b1), F.linear(x, w3, b3), c, time_col), w2, b2)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(swiglu_ffn(*inputs, time_col), got, rtol=0, atol=0)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    rows = mask[:, 0]
    assert gradcheck(lambda xx, a1, c1, a3, c3, a2, c2, cc: _SwiGLUFFN.apply(
        xx, a1 * mask, c1 * rows, a3 * mask, c3 * rows, a2, c2, cc, time_col), inputs)

    torch.manual_seed(0)
    layer = LorentzFeedForward(37, 61)
    x = torch.randn(2, 24, 37, requires_grad=True)
    fused = layer(x)
    nodes, stack = set(), [fused.grad_fn]
    while stack:
        node = stack.pop()
        nodes.add(node.name())
        stack.extend(n for n, _ in node.next_functions if n is not None)
    assert "_SwiGLUFFNBackward" in nodes
    grads = torch.autograd.grad(fused.square().sum(), [x, *layer.parameters()])
    monkeypatch.setattr(ffn, "swiglu_ffn", lambda x_, w1_, b1_, w3_, b3_, w2_, b2_, c_, time_col: F.linear(
        swiglu_lift(F.linear(x_, w1_, b1_), F.linear(x_, w3_, b3_), c_, time_col), w2_, b2_))
    plain = layer(x)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(plain.square().sum(), [x, *layer.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # fp32, blocks' order


@pytest.mark.parametrize("space_only", [False, True])
def test_fused_lorentz_rmsnorm_matches_the_plain_graph(space_only):
    """``LorentzRMSNorm``'s training path (one autograd node reading the space part in place) against the plain
    formula in fp64: values, gradients in the input, the weight and a learned curvature; the input's time column
    gets exactly 0; gradcheck; the no-grad path gives the same values."""
    from torch.autograd import gradcheck

    from helmlm.geometry import lift
    from helmlm.nn.norm import LorentzRMSNorm, _LorentzRMSNorm

    gen = torch.Generator().manual_seed(0)
    space, eps = 6, 1e-6
    x = (torch.randn(3, 4, space + (0 if space_only else 1), dtype=torch.float64, generator=gen) * 5).requires_grad_()
    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    norm = LorentzRMSNorm(space, eps=eps, curvature=c).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(space, dtype=torch.float64, generator=gen) + 0.5)
    x_s = x if space_only else x[..., 1:]
    want = lift(norm.weight * x_s / (x_s.square().mean(-1, keepdim=True) + eps).sqrt(), c)
    got = norm(x, space_only=space_only)
    assert got.grad_fn.name().startswith("_LorentzRMSNorm")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(norm(x, space_only=space_only), want, rtol=1e-14, atol=1e-14)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    got_grads = torch.autograd.grad(got, (x, norm.weight, c), upstream)
    for a, b in zip(got_grads, torch.autograd.grad(want, (x, norm.weight, c), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if not space_only:
        assert got_grads[0][..., 0].abs().max() == 0
    offset = 0 if space_only else 1
    assert gradcheck(lambda a, w, cc: _LorentzRMSNorm.apply(a, w, cc, eps, offset), (x, norm.weight, c))


_MALLOC_PROBE = """
import sys, torch
from helmlm.training.allocator import apply_cpu_malloc
changed = apply_cpu_malloc(sys.argv[1])
def rss_mb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024
base = rss_mb()
blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, written
del blocks
print(changed, rss_mb() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_cpu_malloc_keep_keeps_freed_memory_for_reuse():
    """``train.cpu_malloc: keep`` (a fresh process each way, the setting is process-wide): 256 MiB of 4 MiB tensors
    freed stay in the process for the next allocations; with the C library's defaults they go back to the system."""
    from helmlm.training.allocator import apply_cpu_malloc

    results = {}
    for policy in ("keep", "system"):
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, policy], capture_output=True, text=True,
                             check=True).stdout.split()
        results[policy] = (out[0] == "True", int(out[1]))
    assert results["keep"][0] and results["keep"][1] > 200, results
    assert not results["system"][0] and results["system"][1] < 64, results
    with pytest.raises(ValueError, match="cpu_malloc must be one of keep, system"):
        apply_cpu_malloc("tcmalloc")


def test_lorentz_normalize_closed_form_matches_the_plain_graph():
    """``lorentz_normalize``'s training path (one autograd node) against the formula's autograd graph in fp64, for
    time-like and space-like vectors (the sign of ``<a, a>_L``) and a learned curvature; gradcheck; the no-grad path
    gives the same values."""
    from torch.autograd import gradcheck

    from helmlm.geometry.lorentz import _LorentzNormalize, lorentz_normalize, minkowski_inner

    gen = torch.Generator().manual_seed(0)
    timelike = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen)
    timelike[..., 0] = timelike[..., 1:].norm(dim=-1) * 1.5 + 0.3
    spacelike = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    c = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    for a in (timelike.requires_grad_(), spacelike.requires_grad_()):
        want = a * (c.sqrt() / minkowski_inner(a, a, keepdim=True).abs().clamp_min(1e-8).sqrt())
        got = lorentz_normalize(a, c)
        assert got.grad_fn.name().startswith("_LorentzNormalize")
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        with torch.no_grad():
            torch.testing.assert_close(lorentz_normalize(a, c), want, rtol=1e-14, atol=1e-14)
        upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
        for x, y in zip(torch.autograd.grad(got, (a, c), upstream), torch.autograd.grad(want, (a, c), upstream)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        assert gradcheck(lambda x, cc: _LorentzNormalize.apply(x, cc, 1e-8), (a, c))
    # laid out in another axis order (attention's heads-last output): the same values and gradients
    a = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    got = lorentz_normalize(a, c, memory_order=(0, 2, 1, 3))
    assert got.shape == a.shape and got.transpose(1, 2).is_contiguous()
    want = lorentz_normalize(a, c)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for x, y in zip(torch.autograd.grad(got, (a, c), upstream), torch.autograd.grad(want, (a, c), upstream)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_decoding_ffn_multiplies_by_its_weights_in_place():
    """For a few rows (decoding steps), the HFFN reads its weights where they lie: no padding op (eager returns a
    zero-width pad as is, but a compiled step copies it: W2's copy took a tenth of helm_d_small's compiled decoding
    step) and no op that writes a weight-sized tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from helmlm.geometry import lift
    from helmlm.nn.ffn import LorentzFeedForward

    sizes, names = [], []

    class RecordSizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            names.append(str(func))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            sizes.extend((str(func), t.numel()) for t in torch.utils._pytree.tree_leaves(out)  # new tensors only
                         if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
            return out

    torch.manual_seed(0)
    ffn = LorentzFeedForward(33, 72)  # 71 hidden space coordinates: padded to 72 for many rows
    x = lift(torch.randn(2, 1, 32), 1.0)
    with torch.no_grad(), RecordSizes():
        out = ffn(x)
    smallest_weight = min(p.numel() for p in ffn.parameters() if p.dim() == 2)
    assert sizes and max(n for _, n in sizes) < smallest_weight, sorted(sizes, key=lambda s: -s[1])[:3]
    assert not [name for name in names if "pad" in name], names
    with torch.no_grad():  # and the same values as the padded path of many rows
        many = ffn(torch.cat([x, lift(torch.randn(2, 16, 32), 1.0)], dim=1))
    torch.testing.assert_close(out, many[:, :1], rtol=1e-5, atol=1e-5)


def test_compiled_hffn_runs_its_fused_node_as_one_op():
    """Compiled training on CPU calls the HFFN's fused node as one opaque op (``helmlm::swiglu_ffn``, whose
    registrations pass ``opcheck``): the traced graph holds it, and values and gradients are the eager node's."""
    from helmlm.geometry import lift
    from helmlm.nn.ffn import LorentzFeedForward, _swiglu_ffn_op

    torch.manual_seed(0)
    ffn = LorentzFeedForward(33, 72)
    x = lift(torch.randn(2, 40, 32), 1.0).requires_grad_()
    w1, w3 = (F.pad(w, (0, 0, 1, 0)) for w in (ffn.w1.weight, ffn.w3.weight))
    b1, b3 = (F.pad(b, (1, 0)) for b in (ffn.w1.bias, ffn.w3.bias))
    w2, b2 = F.pad(ffn.w2.weight, (0, 0, 0, 0)), ffn.w2.bias
    torch.library.opcheck(_swiglu_ffn_op, (x, w1, b1, w3, b3, w2, b2, torch.tensor(1.0), 0))

    upstream = torch.randn(2, 40, 33)
    want = torch.autograd.grad(ffn(x), (x, *ffn.parameters()), upstream)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(ffn, backend=backend, fullgraph=True)
    got = torch.autograd.grad(compiled(x), (x, *ffn.parameters()), upstream)
    assert any(node.target is torch.ops.helmlm.swiglu_ffn.default for gm in graphs for node in gm.graph.nodes)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # A learned curvature (the op has no gradient for it) takes the plain ops: its gradient is the eager one.
    c = torch.tensor(1.3, requires_grad=True)
    want_c = torch.autograd.grad(ffn(x, curvature=c), c, upstream)[0]
    torch._dynamo.reset()
    got_c = torch.autograd.grad(torch.compile(lambda x, c: ffn(x, curvature=c), backend="aot_eager")(x, c), c,
                                upstream)[0]
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-5)
