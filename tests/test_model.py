"""Tests of HELMForCausalLM (HELM-D, HELM-MiCE and their Euclidean twins) on tiny configs: causality, document isolation, the
loss, manifold constraints of the hidden states, bf16 autocast, input/config errors, dead parameters, config
round trip."""

from __future__ import annotations

import pytest
import torch

from helmlm.geometry import manifold_violation
from helmlm.models import ConfigError, HELMConfig, HELMForCausalLM, InputError

# ---------------------------------------------------------------------------------------------------------------
# Helper builders
# ---------------------------------------------------------------------------------------------------------------
VOCAB = 97
MAX_POS = 64
# Architectures by name. Lorentz: ambient width 34, 2 heads of 17 ambient = 16 (even) rotated space coordinates.
# Euclidean: 2 heads of 16. The MoE variants: HMLA/MLA (latent 8, 8 rotated dims) and 1 dense + 1 routed layer
# (4 experts, top-2, 1 shared).
_MOE = dict(attention="mla", ffn="moe", kv_lora_rank=8, n_dense_layers=1, n_routed_experts=4,
            n_activated_experts=2, n_shared_experts=1, moe_intermediate_size=20)
VARIANTS = {
    "lorentz": dict(geometry="lorentz", hidden_size=34),
    "euclidean": dict(geometry="euclidean", hidden_size=32),
    "lorentz-mice": dict(geometry="lorentz", hidden_size=34, qk_nope_head_dim=9, qk_rope_head_dim=9,
                         v_head_dim=9, **_MOE),
    "euclidean-moe": dict(geometry="euclidean", hidden_size=32, qk_nope_head_dim=8, qk_rope_head_dim=8,
                          v_head_dim=8, **_MOE),
}
GEOMETRIES = list(VARIANTS)
DTYPES = [torch.float32, torch.float64]
# Packed rows of several documents, split differently per row (N = 24).
DOC_LENGTHS = [[7, 9, 8], [12, 5, 7]]


def tiny_config(geometry: str = "lorentz", **overrides) -> HELMConfig:
    kwargs = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_POS,
                  **VARIANTS.get(geometry, dict(geometry=geometry, hidden_size=34)))
    kwargs.update(overrides)
    return HELMConfig(**kwargs)


def build_model(geometry: str = "lorentz", dtype: torch.dtype = torch.float32, seed: int = 0,
                **overrides) -> HELMForCausalLM:
    torch.manual_seed(seed)
    return HELMForCausalLM(tiny_config(geometry, **overrides)).to(dtype).eval()


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def packed_document_ids(lengths_per_row=DOC_LENGTHS) -> torch.Tensor:
    """``(B, N)`` document labels 0, 1, 2, ... of packed rows with the given document lengths."""
    return torch.tensor([sum(([doc] * n for doc, n in enumerate(lengths)), []) for lengths in lengths_per_row])


def restarting_positions(lengths_per_row=DOC_LENGTHS) -> torch.Tensor:
    """``(B, N)`` position ids that restart at 0 at every document start."""
    return torch.tensor([sum((list(range(n)) for n in lengths), []) for lengths in lengths_per_row])


def replace_tokens(ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """A copy of ``ids`` with every token in ``where`` replaced by a different token."""
    out = ids.clone()
    out[where] = (out[where] + 1 + torch.randint(0, VOCAB - 1, out[where].shape)) % VOCAB
    assert (out[where] != ids[where]).all()
    return out


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None = None) -> float:
    """Shifted next-token cross-entropy by an explicit loop: position t predicts labels[t+1], skipping -100 targets
    and targets in another document than position t."""
    log_probs = logits.double().log_softmax(-1)
    total, count = 0.0, 0
    batch, length = labels.shape
    for b in range(batch):
        for t in range(length - 1):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            if document_ids is not None and document_ids[b, t].item() != document_ids[b, t + 1].item():
                continue
            total -= log_probs[b, t, target].item()
            count += 1
    return total / count


def lorentz_hidden_states(model: HELMForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the embedding, of every block and of the final norm, collected with forward hooks."""
    states: list[torch.Tensor] = []
    modules = [model.model.embed, *model.model.layers, model.model.norm]
    handles = [m.register_forward_hook(lambda _m, _i, out: states.append(out.detach())) for m in modules]
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    assert len(states) == len(modules)
    return states


# ---------------------------------------------------------------------------------------------------------------
# Causality and document isolation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_future_tokens_do_not_change_past_logits(geometry, dtype):
    """Changing tokens after position t leaves the logits at positions <= t bit-identical."""
    torch.manual_seed(0)
    model = build_model(geometry, dtype)
    ids = random_ids(2, 24, seed=1)
    t = 9
    future = torch.zeros_like(ids, dtype=torch.bool)
    future[:, t + 1:] = True
    with torch.no_grad():
        before = model(ids).logits
        after = model(replace_tokens(ids, future)).logits
    assert before.dtype == dtype
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:]), "the change had no effect at all"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_documents_do_not_see_each_other(geometry, dtype):
    """With document_ids, changing one document's tokens leaves every other document's logits bit-identical."""
    torch.manual_seed(0)
    model = build_model(geometry, dtype)
    ids, doc_ids, positions = random_ids(2, 24, seed=2), packed_document_ids(), restarting_positions()
    for changed_doc in (0, 1, 2):
        changed = doc_ids == changed_doc
        with torch.no_grad():
            before = model(ids, document_ids=doc_ids, position_ids=positions).logits
            after = model(replace_tokens(ids, changed), document_ids=doc_ids, position_ids=positions).logits
        assert torch.equal(before[~changed], after[~changed]), f"document {changed_doc} leaked"
        assert not torch.allclose(before[changed], after[changed])


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_packed_document_equals_document_alone(geometry):
    """A packed document with positions restarting at 0 has the logits of that document run alone (fp64), and
    the first document's logits equal those of a plain causal run of the whole row exactly."""
    torch.manual_seed(0)
    model = build_model(geometry, torch.float64)
    ids, doc_ids, positions = random_ids(2, 24, seed=3), packed_document_ids(), restarting_positions()
    with torch.no_grad():
        packed = model(ids, document_ids=doc_ids, position_ids=positions).logits
        causal = model(ids).logits
        for row, lengths in enumerate(DOC_LENGTHS):
            start = 0
            for length in lengths:
                alone = model(ids[row: row + 1, start: start + length]).logits[0]
                torch.testing.assert_close(packed[row, start: start + length], alone, rtol=0, atol=1e-12)
                start += length
            first = lengths[0]
            assert torch.equal(packed[row, :first], causal[row, :first])
    # The other documents really differ from the causal run (they must not see earlier documents).
    later = doc_ids > 0
    assert (packed[later] - causal[later]).abs().max().item() > 1e-3


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_packed_logits_depend_only_on_relative_positions(geometry):
    """(Ho)PE is relative: packed documents give the same logits (to fp64 rounding) whether positions restart at
    each document, run on, or are offset by 1000; position_ids with other distances change the logits."""
    torch.manual_seed(0)
    model = build_model(geometry, torch.float64)
    ids, doc_ids = random_ids(2, 24, seed=4), packed_document_ids()
    with torch.no_grad():
        reset = model(ids, document_ids=doc_ids, position_ids=restarting_positions()).logits
        running = model(ids, document_ids=doc_ids).logits
        shifted = model(ids, document_ids=doc_ids, position_ids=torch.arange(24).expand(2, -1) + 1000).logits
        spread = model(ids, document_ids=doc_ids, position_ids=2 * restarting_positions()).logits
    torch.testing.assert_close(running, reset, rtol=0, atol=1e-10)
    torch.testing.assert_close(shifted, reset, rtol=0, atol=1e-10)
    # position_ids do reach the rotary tables: doubling every distance changes the logits (after each first token).
    assert (spread - reset).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_loss_is_shifted_cross_entropy(geometry):
    """loss equals an explicit-loop shifted cross-entropy: plain, with -100 labels ignored, and with document_ids
    excluding the targets that cross a document boundary. (The balance loss is off here; see
    test_loss_adds_the_weighted_balance_loss.)"""
    torch.manual_seed(0)
    model = build_model(geometry, moe_balance_alpha=0.0)
    ids, doc_ids = random_ids(2, 24, seed=5), packed_document_ids()
    labels = ids.clone()
    labels[0, 3] = labels[1, 15] = labels[1, 20] = -100

    with torch.no_grad():
        out = model(ids, labels=ids)
        assert out.loss.item() == pytest.approx(reference_loss(out.logits, ids), rel=1e-5)

        out = model(ids, labels=labels)
        assert out.loss.item() == pytest.approx(reference_loss(out.logits, labels), rel=1e-5)
        assert out.loss.item() != pytest.approx(reference_loss(out.logits, ids), rel=1e-5)

        out = model(ids, labels=labels, document_ids=doc_ids)
        expected = reference_loss(out.logits, labels, doc_ids)
        assert out.loss.item() == pytest.approx(expected, rel=1e-5)
        assert out.loss.item() != pytest.approx(reference_loss(out.logits, labels), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Manifold constraint and residual scale of the Lorentz model
# ---------------------------------------------------------------------------------------------------------------
def test_lorentz_hidden_states_on_manifold_at_residual_scale():
    """At init, the embedding, every block output and the final norm are on the hyperboloid (fp32, <= 1e-3 of c),
    and block outputs have space norms of the size set by the residual scale 4 sqrt(W)."""
    torch.manual_seed(0)
    model = build_model("lorentz", curvature=1.5)
    c, scale = model.config.curvature, model.config.resolved_residual_scale()
    states = lorentz_hidden_states(model, random_ids(2, 24, seed=6))
    for i, h in enumerate(states):
        assert h.dtype == torch.float32 and h.shape == (2, 24, VARIANTS["lorentz"]["hidden_size"])
        assert torch.isfinite(h).all()
        assert manifold_violation(h, c).max().item() <= 1e-3, f"hidden state {i}"
    for i, h in enumerate(states[1:-1]):
        space_norm = h[..., 1:].norm(dim=-1)
        # |h_s| = scale * |z_s| with z the normalised sum of two points, |z_s| = O(1) (measured ~0.7-2.3).
        assert space_norm.min().item() >= scale / 4, f"block {i}"
        assert space_norm.max().item() <= scale * 4, f"block {i}"

    # The configured residual scale is what sets this magnitude at every residual (after attention and after the
    # FFN): a 4x smaller scale gives ~4x smaller norms.
    def residual_norms(model):
        norms = []
        residuals = [m for layer in model.model.layers for m in (layer.attn_residual, layer.ffn_residual)]
        handles = [m.register_forward_hook(lambda _m, _i, out: norms.append(out[..., 1:].norm(dim=-1).mean()))
                   for m in residuals]
        model(random_ids(2, 24, seed=6))
        for h in handles:
            h.remove()
        assert len(norms) == 2 * model.config.num_hidden_layers
        return torch.stack(norms)

    torch.manual_seed(0)
    small = build_model("lorentz", curvature=1.5, residual_scale=scale / 4)
    ratios = residual_norms(model) / residual_norms(small)
    assert ((ratios > 2.0) & (ratios < 8.0)).all(), ratios


@pytest.mark.parametrize("geometry", ["lorentz-mice", "euclidean-moe"])
def test_loss_adds_the_weighted_balance_loss(geometry):
    """With routed layers, loss = cross-entropy + moe_balance_alpha * aux_loss, aux_loss being the sum of the
    layers' balance losses (each >= 1, the value of a perfectly balanced router); dense models have no aux_loss."""
    torch.manual_seed(0)
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        plain = build_model(geometry, moe_balance_alpha=0.0)(ids, labels=ids)
        weighted = build_model(geometry, moe_balance_alpha=0.5)(ids, labels=ids)
    n_routed = 1
    assert plain.aux_loss is not None and plain.aux_loss.item() >= n_routed * (1 - 1e-6)
    assert torch.equal(plain.logits, weighted.logits)
    assert weighted.loss.item() == pytest.approx(plain.loss.item() + 0.5 * weighted.aux_loss.item(), rel=1e-6)
    assert build_model("lorentz")(ids, labels=ids).aux_loss is None


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_right_padding_changes_nothing_real(geometry):
    """With attention_mask, right padding leaves the real tokens' logits and the loss as without it (fp64)."""
    torch.manual_seed(0)
    model = build_model(geometry, torch.float64)
    ids = random_ids(2, 20, seed=11)
    padded = torch.cat([ids, random_ids(2, 4, seed=12)], dim=1)
    mask = torch.cat([torch.ones(2, 20, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids, labels=ids)
        with_pad = model(padded, labels=padded, attention_mask=mask)
    assert torch.allclose(with_pad.logits[:, :20], alone.logits, atol=1e-10, rtol=0)
    assert with_pad.loss.item() == pytest.approx(alone.loss.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# bf16 autocast
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bf16_autocast_forward_backward(geometry):
    """Under CPU bf16 autocast, forward + backward run with finite loss and gradients, and the logits stay
    within 10% of the logits' std of the fp32 logits."""
    torch.manual_seed(0)
    model = build_model(geometry).train()
    ids, doc_ids = random_ids(2, 24, seed=7), packed_document_ids()
    with torch.no_grad():
        fp32_logits = model(ids, document_ids=doc_ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, document_ids=doc_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # bf16 keeps 8 mantissa bits (rounding ~0.4%); ~15 chained matmuls give a few percent of the logits' scale
    # (measured ~1.5-3%). 10% leaves margin and still catches a manifold op run in bf16 (which loses c
    # against |x_s|^2 ~ 1e3 and moves logits by O(std)).
    diff = (out.logits.float() - fp32_logits).abs().max().item()
    std = fp32_logits.std().item()
    print(f"{geometry}: max |logits_bf16 - logits_fp32| = {diff:.4g} (logits std {std:.4g}, ratio {diff / std:.3g})")
    assert diff < 0.1 * std


# ---------------------------------------------------------------------------------------------------------------
# Input and configuration errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bad_inputs_raise_input_error(geometry):
    """Bad token ids, lengths, dtypes and document_ids shapes raise InputError naming the offending values."""
    torch.manual_seed(0)
    model = build_model(geometry)
    ids = random_ids(2, 10, seed=8)

    too_big = ids.clone()
    too_big[1, 4] = VOCAB + 3
    with pytest.raises(InputError, match=rf"token id {VOCAB + 3}\b.*\b{VOCAB}\b"):
        model(too_big)
    negative = ids.clone()
    negative[0, 0] = -2
    with pytest.raises(InputError, match=r"token id -2\b"):
        model(negative)
    with pytest.raises(InputError, match=rf"\b{MAX_POS + 1}\b.*max_position_embeddings={MAX_POS}\b"):
        model(random_ids(1, MAX_POS + 1, seed=9))
    with pytest.raises(InputError, match=r"integer.*float32"):
        model(ids.float())
    with pytest.raises(InputError, match=r"document_ids.*\(2, 10\).*\(2, 9\)"):
        model(ids, document_ids=torch.zeros(2, 9, dtype=torch.long))
    model(random_ids(1, MAX_POS, seed=9))  # exactly max_position_embeddings is fine


@pytest.mark.parametrize(
    "geometry,overrides,pattern",
    [
        # Lorentz: 66 / 3 = 22 ambient per head -> 21 space coordinates rotated by HoPE.
        ("lorentz", dict(hidden_size=66, num_attention_heads=3), r"rotary dim 21 is odd.*22 ambient"),
        ("euclidean", dict(hidden_size=30, num_attention_heads=2), r"rotary dim 15 is odd"),
        ("lorentz", dict(hidden_size=34, num_attention_heads=3), r"hidden_size=34.*num_attention_heads=3"),
        ("euclidean", dict(hidden_size=32, num_attention_heads=5), r"hidden_size=32.*num_attention_heads=5"),
        ("spherical", dict(), r"geometry.*spherical"),
        ("lorentz", dict(vocab_size=0), r"vocab_size.*0"),
        ("lorentz", dict(hidden_size=-2), r"hidden_size.*-2"),
        ("euclidean", dict(num_hidden_layers=0), r"num_hidden_layers.*0"),
        ("lorentz", dict(num_attention_heads=0), r"num_attention_heads.*0"),
        ("lorentz", dict(num_attention_heads=-1), r"num_attention_heads.*-1"),
        ("lorentz", dict(intermediate_size=-1), r"intermediate_size.*-1"),
        ("euclidean", dict(max_position_embeddings=0), r"max_position_embeddings.*0"),
        ("lorentz", dict(curvature=0.0), r"curvature"),
        ("lorentz", dict(embedding_init_scale=0.0), r"embedding_init_scale must be a number > 0"),
        ("lorentz", dict(head_init_std=-0.1), r"head_init_std must be a number > 0 or null"),
        ("lorentz-mice", dict(gate_init_gain="big"), r"gate_init_gain must be a number > 0, got 'big'"),
    ],
)
def test_invalid_config_raises_config_error(geometry, overrides, pattern):
    """HELMConfig.validate (also run by the model constructor) raises ConfigError naming the invalid field/dim."""
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(geometry, **overrides).validate()
    with pytest.raises(ConfigError, match=pattern):
        HELMForCausalLM(tiny_config(geometry, **overrides))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_valid_tiny_config_validates(geometry):
    """The tiny configs used here are valid (so the error cases above are errors of the changed field)."""
    torch.manual_seed(0)
    tiny_config(geometry).validate()


# ---------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.25, 1.0, 2.5])
def test_embedding_init_scale_is_the_tables_geodesic_radius(scale):
    """Every row of the Lorentz table starts on the hyperboloid at geodesic distance ``embedding_init_scale`` from
    the origin (1 by default, the reference's); for ``project_emb`` it is the standard deviation of the table."""
    curvature = 2.0
    model = build_model("lorentz", curvature=curvature, embedding_init_scale=scale)  # fp32 table
    table = model.model.embed.weight.detach().double()
    assert manifold_violation(table, curvature).max() < 1e-6
    radius = (curvature ** 0.5) * torch.acosh(table[:, 0] / curvature ** 0.5)  # d(o, x) = sqrt(c) acosh(x_t / sqrt(c))
    torch.testing.assert_close(radius, torch.full_like(radius, scale), rtol=1e-3, atol=1e-3)
    projected = build_model("lorentz", project_emb=True, embedding_init_scale=scale, vocab_size=4096)
    assert projected.model.embed.weight.std().item() == pytest.approx(scale, rel=0.02)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_head_init_std(geometry):
    """``head_init_std`` draws the head from N(0, std^2); unset, the head keeps PyTorch's Linear init (uniform with
    bound 1 / sqrt(fan_in)), as the reference; nothing else changes."""
    default = build_model(geometry, seed=3, vocab_size=4096)
    bound = default.lm_head.in_features ** -0.5
    assert default.lm_head.weight.abs().max().item() <= bound
    assert default.lm_head.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.02)
    scaled = build_model(geometry, seed=3, vocab_size=4096, head_init_std=0.3)
    assert scaled.lm_head.weight.std().item() == pytest.approx(0.3, rel=0.02)
    assert scaled.lm_head.weight.mean().abs().item() < 0.01
    others = {n: p for n, p in scaled.state_dict().items() if not n.startswith("lm_head")}
    for name, value in default.state_dict().items():
        if not name.startswith("lm_head"):
            assert torch.equal(others[name], value), name


@pytest.mark.parametrize("geometry", ["lorentz-mice", "euclidean-moe"])
def test_gate_init_gain_scales_the_router(geometry):
    """``gate_init_gain`` multiplies the router's Xavier-uniform bound, so the initial logits scale with it."""
    default, scaled = build_model(geometry, seed=5), build_model(geometry, seed=5, gate_init_gain=0.1)
    gates = [(m.ffn.gate.weight, s.ffn.gate.weight) for m, s in zip(default.model.layers, scaled.model.layers)
             if hasattr(m.ffn, "gate")]
    assert gates
    for w, w_scaled in gates:
        bound = (6 / sum(w.shape)) ** 0.5
        assert w.abs().max().item() <= bound
        assert w_scaled.abs().max().item() <= 0.1 * bound
        assert w_scaled.abs().max().item() > 0.05 * bound


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_no_dead_parameters(geometry):
    """After one backward on random tokens every trainable parameter has a non-zero gradient."""
    torch.manual_seed(0)
    model = build_model(geometry).train()
    ids = random_ids(2, 24, seed=10)
    model(ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    dead = [n for n, p in trainable if p.grad is None or not p.grad.abs().gt(0).any()]
    assert dead == []


@pytest.mark.parametrize(
    "geometry,overrides",
    [
        ("lorentz", dict()),
        ("lorentz", dict(project_emb=True, curvature=2.0, residual_scale=7.0, intermediate_size=40,
                         attention_temperature=3.0, rope_theta=500.0, embedding_init_scale=0.5, head_init_std=0.1)),
        ("euclidean", dict(intermediate_size=48)),
    ],
)
def test_config_round_trip(geometry, overrides):
    """HELMConfig -> to_dict -> HELMConfig(**d) keeps every field and builds a model with the same parameter
    names and shapes, which computes the same logits from the same weights."""
    torch.manual_seed(0)
    config = tiny_config(geometry, **overrides)
    d = config.to_dict()
    again = HELMConfig(**d)
    for key, value in tiny_config(geometry, **overrides).to_dict().items():
        if key != "transformers_version":
            assert getattr(again, key) == value, key
    model = build_model(geometry, **overrides)
    twin = HELMForCausalLM(again).eval()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in twin.named_parameters()}
    twin.load_state_dict(model.state_dict())
    ids = random_ids(1, 12, seed=11)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
