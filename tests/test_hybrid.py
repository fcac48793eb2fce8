"""Hybrid decoders (``model.swapped_components``, :mod:`helmlm.models.hybrid`): HELM-D with one part from its
Euclidean twin and LLaMA with one part from HELM-D, crossing at the origin. Each hybrid is checked against a
composition of plain layers (the oracle), for causality and document isolation, for gradients in every parameter,
for its size against its base, and for the config errors that guard it."""

from __future__ import annotations

import pytest
import torch

from helmlm.geometry import expmap0, logmap0, manifold_violation
from helmlm.models import ConfigError, HELMConfig, HELMForCausalLM
from helmlm.models.hybrid import COMPONENTS, cross
from helmlm.nn import LorentzRMSNorm, LorentzSelfAttention, RMSNorm, SelfAttention, rotary_tables

VOCAB = 97
BASES = {"lorentz": dict(geometry="lorentz", hidden_size=34, intermediate_size=68),
         "euclidean": dict(geometry="euclidean", hidden_size=32, intermediate_size=64)}


def config(base: str, swapped: list[str], **overrides) -> HELMConfig:
    return HELMConfig(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                      swapped_components=swapped, **BASES[base], **overrides)


def model(base: str, swapped: list[str], dtype=torch.float64, seed: int = 0, **overrides) -> HELMForCausalLM:
    torch.manual_seed(seed)
    return HELMForCausalLM(config(base, swapped, **overrides)).to(dtype).eval()


def ids(batch: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


CASES = [(base, part) for base in BASES for part in COMPONENTS]


def test_cross_maps_at_the_origin():
    """Crossing is logmap0 one way and expmap0 the other, exact inverses; within one geometry it is the identity."""
    v = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    point = cross(v, "euclidean", "lorentz", 2.0)
    assert manifold_violation(point, 2.0, relative_to="scale").max() < 1e-14
    torch.testing.assert_close(point, expmap0(v, 2.0))
    torch.testing.assert_close(cross(point, "lorentz", "euclidean", 2.0), v)
    torch.testing.assert_close(logmap0(point, 2.0), v)
    assert cross(v, "euclidean", "euclidean", 2.0) is v


@pytest.mark.parametrize("base,part", CASES)
def test_one_part_in_the_other_geometry(base, part):
    """Exactly the swapped part changes class; the others keep the base's, and the LM head reads the head's
    geometry's width (one coordinate more for a Lorentz head)."""
    m = model(base, [part])
    other = "euclidean" if base == "lorentz" else "lorentz"
    assert m.model.geometries == {p: other if p == part else base for p in COMPONENTS}
    block = m.model.layers[0]
    lorentz_attention = m.model.geometries["attention"] == "lorentz"
    assert isinstance(block.attn, LorentzSelfAttention if lorentz_attention else SelfAttention)
    assert isinstance(block.attn_norm, LorentzRMSNorm if m.model.geometries["norm"] == "lorentz" else RMSNorm)
    width = 33 if base == "lorentz" else 32  # the Euclidean parts' features
    assert m.lm_head.in_features == width + (m.model.geometries["head"] == "lorentz")
    assert (m.model.final_proj is not None) == (m.model.geometries["head"] == "lorentz")


def test_without_final_projection_the_norm_reads_the_last_point():
    """``final_projection=False`` is the reference's model whose final LorentzLinear keeps the space part
    (weight ``[0 | I]``, bias 0): the same logits, and exactly that layer's parameters fewer; in a hybrid with a
    Lorentz head too."""
    for swapped in ([], ["attention"]):
        with_proj = model("lorentz", swapped)
        torch.manual_seed(0)
        without = HELMForCausalLM(config("lorentz", swapped, final_projection=False)).to(torch.float64).eval()
        assert without.model.final_proj is None
        state = {k: v for k, v in with_proj.state_dict().items() if not k.startswith("model.final_proj.")}
        without.load_state_dict(state)
        proj = with_proj.model.final_proj
        with torch.no_grad():
            proj.weight.zero_()
            proj.weight[:, 1:] = torch.eye(proj.weight.shape[0], dtype=proj.weight.dtype)
            proj.bias.zero_()
        torch.testing.assert_close(without(ids()).logits, with_proj(ids()).logits, rtol=1e-12, atol=1e-12)
        removed = sum(p.numel() for p in with_proj.parameters()) - sum(p.numel() for p in without.parameters())
        assert removed == proj.weight.numel() + proj.bias.numel() == 33 * 34 + 33


@pytest.mark.parametrize("preset", ["helm_d_tiny", "llama_tiny"])
def test_size_stays_near_the_base(preset):
    """On the tiny presets a swap changes the parameter count by under 1 % (most for the head, whose width moves by
    one coordinate, and the Lorentz head's final projection), and by at most 4 for the norm or the residual."""
    from helmlm.models import load_config
    from helmlm.models.params import count_parameters

    reference = count_parameters(load_config(preset))["total"]
    for part in COMPONENTS:
        table = {"project_emb": False} if part == "embedding" and preset.startswith("helm") else {}
        swapped = count_parameters(load_config(preset, swapped_components=[part], **table))["total"]
        assert abs(swapped - reference) / reference < 0.01, part
        if part in ("norm", "residual"):
            assert abs(swapped - reference) <= 4, part


def test_attention_crossing_equals_its_composition():
    """HELM-D with a Euclidean attention: the block's first half is the Lorentzian residual of the stream with
    expmap0(SelfAttention(logmap0(LorentzRMSNorm(h)))), composed here from the block's own layers."""
    m = model("lorentz", ["attention"])
    block = m.model.layers[0]
    assert isinstance(block.attn, SelfAttention) and block.attn.head_dim == 16
    h = m.model.embed(ids(1, 10))
    cos, sin = rotary_tables(torch.arange(10)[None], m.config.rotary_dim, m.config.rope_theta, h.dtype)
    with torch.no_grad():
        expected_half = block.attn_residual(h, expmap0(block.attn(logmap0(block.attn_norm(h), 1.0), cos, sin), 1.0))
        expected = block.ffn_residual(expected_half, block.ffn(block.ffn_norm(expected_half)))
        torch.testing.assert_close(block(h, cos, sin, None), expected)


def test_lorentz_residual_in_llama_equals_its_composition():
    """LLaMA with the Lorentzian residual: the stream is a Lorentz point (the embedding crosses by expmap0), and each
    sublayer's output crosses back by expmap0 before the residual; the head reads logmap0 of the last stream."""
    m = model("euclidean", ["residual"])
    block = m.model.layers[0]
    x = ids(1, 10)
    h = expmap0(m.model.embed(x), 1.0)
    cos, sin = rotary_tables(torch.arange(10)[None], m.config.rotary_dim, m.config.rope_theta, h.dtype)
    with torch.no_grad():
        half = block.attn_residual(h, expmap0(block.attn(block.attn_norm(logmap0(h, 1.0)), cos, sin), 1.0))
        out = block.ffn_residual(half, expmap0(block.ffn(block.ffn_norm(logmap0(half, 1.0))), 1.0))
        torch.testing.assert_close(block(h, cos, sin, None), out)
        assert manifold_violation(out, 1.0).max() < 1e-8
        hidden = m.model.layers[1](out, cos, sin, None)
        torch.testing.assert_close(m(x).logits, m.lm_head(m.model.norm(logmap0(hidden, 1.0))))


@pytest.mark.parametrize("base,part", CASES)
def test_causal_and_trains_every_parameter(base, part):
    """Future tokens leave past logits unchanged, and one backward gives every parameter a finite, non-zero
    gradient (no part is cut off by a crossing)."""
    m = model(base, [part])
    x = ids()
    changed = x.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits[:, :12], m(changed).logits[:, :12], rtol=0, atol=1e-12)
    m.train()
    m(x, labels=x).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().gt(0).any(), name


@pytest.mark.parametrize("base", BASES)
def test_documents_stay_apart(base):
    """Tokens of one packed document do not see the other's, whichever parts are swapped."""
    m = model(base, ["attention", "residual"])
    x = ids(1, 16)
    docs = torch.tensor([[0] * 9 + [1] * 7])
    changed = x.clone()
    changed[:, :9] = (changed[:, :9] + 1) % VOCAB
    with torch.no_grad():
        a = m(x, document_ids=docs, position_ids=torch.tensor([list(range(9)) + list(range(7))])).logits
        b = m(changed, document_ids=docs, position_ids=torch.tensor([list(range(9)) + list(range(7))])).logits
    torch.testing.assert_close(a[:, 9:], b[:, 9:], rtol=0, atol=1e-12)


def test_save_and_load_round_trip(tmp_path):
    """A hybrid saves and loads as any model: same config, same logits."""
    m = model("lorentz", ["ffn", "head"], dtype=torch.float32)
    m.save_pretrained(tmp_path)
    again = HELMForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.swapped_components == ["ffn", "head"]
    x = ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, m(x).logits)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(swapped_components=["attn"]), r"unknown component 'attn' \(did you mean 'attention'\?\)"),
        (dict(swapped_components=["ffn", "ffn"]), r"lists a component twice"),
        (dict(swapped_components=["ffn"], attention="mla"), r"dense multi-head models.*attention=mla"),
        (dict(swapped_components=["embedding"], project_emb=True), r"the table is the twin's \(set project_emb"),
    ],
)
def test_bad_swaps_are_config_errors(overrides, pattern):
    swapped = overrides.pop("swapped_components")
    with pytest.raises(ConfigError, match=pattern):
        config("lorentz", swapped, **overrides).validate()
    with pytest.raises(ConfigError, match="project_emb only applies to a Lorentz token table"):
        config("euclidean", ["norm"], project_emb=True).validate()


def test_space_part_table_in_llama():
    """With the embedding swapped into a LLaMA, ``project_emb`` gives it HELM's space-part table (a plain parameter
    for AdamW, lifted on lookup), which crosses into the stream by logmap0."""
    m = model("euclidean", ["embedding"], project_emb=True, embedding_init_scale=0.1)
    table = m.model.embed
    assert not table.manifold_table and tuple(table.weight.shape) == (VOCAB, 32)
    x = ids(1, 6)
    stream = cross(m.model.embed(x), "lorentz", "euclidean", 1.0)
    torch.testing.assert_close(stream, logmap0(torch.cat([(table.weight[x].square().sum(-1, keepdim=True) + 1).sqrt(),
                                                          table.weight[x]], -1), 1.0))
