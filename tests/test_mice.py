"""HELM-MiCE: reference parity (golden fixture), HMLA vs the naive oracle, MiCE properties."""

from __future__ import annotations

import pytest
import torch
from conftest import load_reference_fixture

from helmlm.compat import ReferenceCompatError, load_reference
from helmlm.geometry import lift, manifold_violation, rescale_curvature
from helmlm.models import ConfigError, HELMConfig, HELMForCausalLM
from helmlm.nn import LorentzFeedForward, LorentzLatentAttention, MiCE, naive_lorentz_attention, rotary_tables


@pytest.fixture(scope="module")
def mice_fixture():
    meta, tensors, state = load_reference_fixture("helm_mice_tiny")
    return meta["constructor"]["args"], tensors, state


def test_mice_fixture_logits_and_expert_choices(mice_fixture):
    """fp64 logits (causal and document-masked) within 1e-5 and identical expert choices per token."""
    args, t, state = mice_fixture
    model = load_reference(state, **args)
    caught = {}
    model.model.layers[1].ffn.gate.register_forward_hook(lambda m, i, o: caught.__setitem__("idx", o[1]))
    with torch.no_grad():
        causal = model(t["input_ids"]).logits
        assert torch.equal(caught["idx"].flatten(0, -2), t["gate_indices.layer1"])
        docs = model(t["input_ids"], document_ids=t["sequence_id"]).logits
        assert torch.equal(caught["idx"].flatten(0, -2), t["gate_indices_docmask.layer1"])
    assert (causal - t["logits"]).abs().max().item() <= 1e-5
    assert (docs - t["logits_docmask"]).abs().max().item() <= 1e-5
    torch.testing.assert_close(model.model.layers[1].ffn.experts.curvatures, t["expert_c.layer1"])
    # reference trainable 276,096 less the dead ones: 2 attention biases, 2 add_pos scalars, the 4-entry gate bias
    # (a buffer here, it never had a gradient)
    assert sum(p.numel() for p in model.parameters()) == 276096 - 8


def test_mice_reference_flag_errors(mice_fixture):
    args, _, state = mice_fixture
    with pytest.raises(ReferenceCompatError, match="q_lora_rank"):
        load_reference(state, **{**args, "q_lora_rank": 8})
    with pytest.raises(ReferenceCompatError, match="YaRN"):
        load_reference(state, **{**args, "max_seq_len": 128})
    with pytest.raises(ReferenceCompatError, match=r"missing keys .*layers\.1\.ffn\.experts\.4"):
        load_reference(state, **{**args, "n_routed_experts": 5, "n_activated_experts": 2})


def test_hmla_matches_naive_oracle_fp64():
    """HMLA through SDPA (with exact zero padding of the shorter head dim) equals the direct formula."""
    torch.manual_seed(0)
    for nope, rope, v in ((9, 7, 12), (5, 9, 4)):
        attn = LorentzLatentAttention(34, 2, 8, nope, rope, v).double()
        x = lift(torch.randn(2, 12, 33, dtype=torch.float64) * 3, 1.0)
        cos, sin = rotary_tables(torch.arange(12)[None], rope - 1, 10000.0, torch.float64)
        docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 8 + [1] * 4])
        from helmlm.nn import document_causal_mask

        for mask in (None, document_causal_mask(docs)):
            got = attn(x, cos, sin, mask)
            q = attn.query(x, cos, sin).transpose(1, 2)
            k, val = (t.transpose(1, 2) for t in attn.expand(*attn.compress(x, cos, sin)))
            o = naive_lorentz_attention(q, k, val, 1.0, attn.temperature, mask)
            expected = attn.wo(o.transpose(1, 2).flatten(-2))
            assert (got - expected).abs().max().item() <= 1e-10


def test_one_expert_top1_is_a_curvature_rescaled_hffn():
    """E=1, k=1, no shared expert, paper mode: MiCE(x) = sqrt(c/c1) * HFFN_c1(sqrt(c1/c) x), computed independently."""
    torch.manual_seed(0)
    mice = MiCE(18, 24, n_routed_experts=1, n_activated_experts=1, n_shared_experts=0, curvatures=[0.6],
                combine="paper").double()
    ffn = LorentzFeedForward(18, 24, curvature=0.6).double()
    e = mice.experts
    with torch.no_grad():
        ffn.w1.weight.copy_(e.w1[0]), ffn.w1.bias.copy_(e.b1[0])
        ffn.w3.weight.copy_(e.w3[0]), ffn.w3.bias.copy_(e.b3[0])
        ffn.w2.weight.copy_(e.w2[0]), ffn.w2.bias.copy_(e.b2[0])
    x = lift(torch.randn(3, 5, 17, dtype=torch.float64) * 4, 1.0)
    c1 = e.curvatures[0].detach()  # 0.6 as stored (log-parameterised, initialised in fp32)
    assert abs(c1.item() - 0.6) < 1e-6
    expected = rescale_curvature(ffn(rescale_curvature(x, 1.0, c1), curvature=c1), c1, 1.0)
    torch.testing.assert_close(mice(x), expected, rtol=1e-10, atol=1e-10)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    mice = MiCE(18, 24, n_routed_experts=4, n_activated_experts=2, combine="paper")
    x = lift(torch.randn(64, 17) * 3, 1.0)
    w0, i0, s0 = mice.gate(x[..., 1:])
    mice.gate.bias.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
    w1, i1, s1 = mice.gate(x[..., 1:])
    assert torch.equal(s0, s1)  # scores are un-biased
    assert set(i1.flatten().tolist()) == {0, 1}  # the bias decides the selection
    torch.testing.assert_close(w1, s1.gather(-1, i1) / s1.gather(-1, i1).sum(-1, keepdim=True))


def test_curvatures_stay_positive_after_a_huge_step():
    mice = MiCE(18, 24, n_routed_experts=4, n_activated_experts=2, curvatures=[0.1, 0.5, 1.0, 2.0])
    opt = torch.optim.SGD(mice.parameters(), lr=1.0)
    x = lift(torch.randn(32, 17) * 3, 1.0)
    (mice(x).sum() * 1e6).backward()
    opt.step()
    assert (mice.experts.curvatures > 0).all() and torch.isfinite(mice.experts.curvatures).all()


@pytest.mark.parametrize("combine", ["paper", "reference"])
def test_mice_model_on_manifold_and_bf16(combine):
    torch.manual_seed(0)
    cfg = HELMConfig(vocab_size=97, hidden_size=34, num_hidden_layers=2, num_attention_heads=2, intermediate_size=68,
                     attention="mla", ffn="moe", kv_lora_rank=8, qk_nope_head_dim=9, qk_rope_head_dim=9,
                     v_head_dim=9, moe_intermediate_size=24, moe_combine=combine, max_position_embeddings=32)
    model = HELMForCausalLM(cfg)
    outs = []
    model.model.layers[1].ffn.register_forward_hook(lambda m, i, o: outs.append(o))
    ids = torch.randint(0, 97, (2, 32))
    model(ids)
    assert manifold_violation(outs[-1], 1.0).max().item() <= 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("bad,match", [
    (dict(n_activated_experts=5), "n_activated_experts=5"),
    (dict(qk_rope_head_dim=8), "rotary dim 7 is odd"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(n_expert_groups=3), "n_expert_groups=3"),
    (dict(score_func="relu"), "score_func"),
    (dict(moe_combine="sum"), "moe_combine"),
    (dict(expert_curvatures=[1.0, -1.0, 1.0, 1.0]), "expert_curvatures"),
])
def test_inconsistent_mice_configs_name_the_field(bad, match):
    cfg = HELMConfig(hidden_size=34, num_attention_heads=2, attention="mla", ffn="moe", **bad)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_mla_init_linear_starts_the_maps_as_nn_linear():
    """``init="linear"`` draws HMLA's four maps as ``nn.Linear`` does (weight and bias within 1/sqrt(fan_in), at
    its std), the reference's ``"xavier"`` leaves LorentzLinear's Xavier (gain sqrt(2)) with zero biases; the
    temperature starts at its value either way."""
    torch.manual_seed(0)
    linear = LorentzLatentAttention(130, 2, 32, 33, 17, 33, init="linear")
    xavier = LorentzLatentAttention(130, 2, 32, 33, 17, 33)
    for name in ("wq", "wkv_a", "wkv_b", "wo"):
        w, b = getattr(linear, name).weight, getattr(linear, name).bias
        bound = w.shape[1] ** -0.5
        assert w.abs().max() <= bound and b.abs().max() <= bound and b.abs().max() > 0, name
        assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1), name
        wx = getattr(xavier, name).weight
        assert wx.std().item() == pytest.approx(2 / (sum(wx.shape)) ** 0.5, rel=0.1), name
        assert torch.count_nonzero(getattr(xavier, name).bias) == 0
    assert linear.temperature.item() == xavier.temperature.item() == 10.0
    with pytest.raises(ValueError, match="init must be one of"):
        LorentzLatentAttention(130, 2, 32, 33, 17, 33, init="kaiming")
