"""Tests of the hyperbolic layers in ``helmlm.nn``: oracles (naive attention, independent formulas) and properties
(points stay on the hyperboloid, HoPE depends only on relative position, masks are what they claim)."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from torch.nn import functional as F

from helmlm.geometry import distance, lift, manifold_violation, minkowski_inner, origin
from helmlm.nn import (
    LorentzEmbedding,
    LorentzFeedForward,
    LorentzLinear,
    LorentzResidual,
    LorentzRMSNorm,
    LorentzSelfAttention,
    apply_rotary,
    document_causal_mask,
    gemm_pad,
    lorentz_init_,
    lorentz_sdpa,
    naive_lorentz_attention,
    rotary_tables,
)

# ---------------------------------------------------------------------------------------------------------------
# Sizes and tolerances
# ---------------------------------------------------------------------------------------------------------------
WIDTH = 34                              # ambient width of the residual stream (33 space coordinates + time)
SPACE = WIDTH - 1
HEADS = 2                               # head_ambient 17, head_space 16 (even, as HoPE needs)
HEAD_SPACE = WIDTH // HEADS - 1
RESIDUAL_SCALE = 4 * math.sqrt(WIDTH)   # HELM-D's fixed residual scale, ~23.3
# Residual-stream space norms in the model are scale * |z_s| with |z_s| ~ 1-3 (see test_model), i.e. ~20-70;
# normalised points (inputs of attention / FFN / linear layers) have |x_s| = sqrt(space_dim) ~ 5.7.
RESIDUAL_NORMS = (40.0, 60.0)
NORMED_NORMS = (4.0, 8.0)
# manifold_violation relative to c: fp32 rounding of x_t alone gives ~1e-7 * x_t^2 / c (~4e-4 at |x_s| = 60).
VIOLATION_TOL = {torch.float32: 1e-3, torch.float64: 1e-9}


# ---------------------------------------------------------------------------------------------------------------
# Helper builders
# ---------------------------------------------------------------------------------------------------------------
def random_space(shape, space_dim, norms, *, generator, dtype=torch.float64):
    """Random space parts with uniformly random directions and norms uniform in ``norms = (lo, hi)``."""
    direction = F.normalize(torch.randn(*shape, space_dim, generator=generator, dtype=torch.float64), dim=-1)
    lo, hi = norms
    radius = lo + (hi - lo) * torch.rand(*shape, 1, generator=generator, dtype=torch.float64)
    return (direction * radius).to(dtype)


def lorentz_points(shape, space_dim, c, norms, *, generator, dtype=torch.float64):
    """Hyperboloid points ``lift(s)`` (computed in fp64, then cast) with ``|s|`` uniform in ``norms``."""
    return lift(random_space(shape, space_dim, norms, generator=generator), c).to(dtype)


def packed_document_ids(lengths_per_row):
    """``(B, N)`` document labels of packed rows, e.g. ``[[3, 5], [6, 2]] -> [[0,0,0,1,1,1,1,1], [0]*6 + [1]*2]``."""
    rows = [sum(([doc] * n for doc, n in enumerate(lengths)), []) for lengths in lengths_per_row]
    assert len({len(r) for r in rows}) == 1, "rows must have equal length"
    return torch.tensor(rows)


# Several packed documents per row, split differently in each row (N = 20).
DOC_LENGTHS = [[5, 8, 7], [11, 2, 7]]


def rotary(positions, rot_dim, dtype=torch.float64, base=10000.0):
    """``cos, sin`` tables of shape ``(1, N, rot_dim/2)`` for a list of positions."""
    return rotary_tables(torch.tensor([positions]), rot_dim, base, dtype)


def violation(x, c):
    return manifold_violation(x, c).max().item()


# ---------------------------------------------------------------------------------------------------------------
# lorentz_sdpa (the SDPA route) against the naive formula
# ---------------------------------------------------------------------------------------------------------------
SDPA_CASES = [(0, 3.0), (1, 30.0), (2, 300.0)]  # (seed, temperature): sharp to soft attention


def _sdpa_inputs(seed, c, tau):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (lorentz_points((2, 3, 20), HEAD_SPACE, c, (1.0, 30.0), generator=g).requires_grad_()
               for _ in range(3))
    temperature = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    return g, q, k, v, temperature


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed,tau", SDPA_CASES)
def test_lorentz_sdpa_matches_naive_attention_fp64(seed, tau, c, masked):
    """The SDPA identity (MATH.md 3) reproduces the naive hyperbolic attention and its gradients in fp64."""
    torch.manual_seed(seed)
    g, q, k, v, temperature = _sdpa_inputs(seed, c, tau)
    mask = document_causal_mask(packed_document_ids(DOC_LENGTHS)) if masked else None

    fast = lorentz_sdpa(q, k, v, c, temperature, mask)
    slow = naive_lorentz_attention(q, k, v, c, temperature, mask)
    assert fast.dtype == torch.float64
    assert (fast - slow).abs().max().item() <= 1e-10

    projection = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    inputs = (q, k, v, temperature)
    grads_fast = torch.autograd.grad((fast * projection).sum(), inputs)
    grads_slow = torch.autograd.grad((slow * projection).sum(), inputs)
    # Gradients reach ~1e4 for sharp attention: compare relative to their size. dL/dtau is a cancelling sum of
    # terms whose total size is sum |q . dL/dq| / tau (the scores are linear in q and scale as 1/tau).
    scales = [gs.abs().max().item() for gs in grads_slow[:3]]
    scales.append((q * grads_slow[0]).abs().sum().item() / tau)
    for name, gf, gs, scale in zip("qkvt", grads_fast, grads_slow, scales):
        assert (gf - gs).abs().max().item() <= 1e-10 * max(1.0, scale), f"gradient wrt {name}"
        assert gs.abs().max().item() > 0, f"gradient wrt {name} vanishes, the comparison proves nothing"


def test_lorentz_sdpa_document_mask_changes_the_result():
    """The document mask passed to lorentz_sdpa is applied (later documents differ from plain causal attention)."""
    torch.manual_seed(0)
    _, q, k, v, temperature = _sdpa_inputs(0, 1.0, 30.0)
    doc_ids = packed_document_ids(DOC_LENGTHS)
    with torch.no_grad():
        causal = lorentz_sdpa(q, k, v, 1.0, temperature)
        masked = lorentz_sdpa(q, k, v, 1.0, temperature, document_causal_mask(doc_ids))
    first_doc = (doc_ids == 0).view(2, 1, -1)
    assert torch.allclose(causal[first_doc.expand(-1, 3, -1)], masked[first_doc.expand(-1, 3, -1)], atol=1e-12)
    assert (causal - masked).abs().max().item() > 1e-3


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_lorentz_sdpa_under_bf16_autocast_stays_fp32_and_on_manifold(masked):
    """Under bf16 autocast the attention core runs in fp32: the output is fp32, finite, on the hyperboloid,
    bit-identical to the fp32 result without autocast, and close to the fp64 oracle."""
    torch.manual_seed(0)
    c = 1.0
    g = torch.Generator().manual_seed(0)
    q, k, v = (lorentz_points((2, 3, 20), HEAD_SPACE, c, (1.0, 30.0), generator=g, dtype=torch.float32)
               for _ in range(3))
    temperature = torch.tensor(30.0)
    mask = document_causal_mask(packed_document_ids(DOC_LENGTHS)) if masked else None

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lorentz_sdpa(q, k, v, c, temperature, mask)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert violation(out, c) <= VIOLATION_TOL[torch.float32]
    assert torch.equal(out, lorentz_sdpa(q, k, v, c, temperature, mask))

    oracle = naive_lorentz_attention(q.double(), k.double(), v.double(), c, temperature.double(), mask)
    assert torch.allclose(out.double(), oracle, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# HoPE (rotary on the space part)
# ---------------------------------------------------------------------------------------------------------------
def _hope_point(space, position, c):
    """Lift of the space vector ``space`` (``(d,)``) rotated to ``position``."""
    cos, sin = rotary([position], space.shape[-1])
    return lift(apply_rotary(space.view(1, 1, 1, -1), cos, sin).view(-1), c)


@pytest.mark.parametrize("c", [0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_hope_inner_product_depends_only_on_relative_position(seed, c):
    """<HoPE_m(q), HoPE_n(k)>_L is a function of n - m only (fp64), and not a constant in n - m."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    q_s, k_s = random_space((2,), HEAD_SPACE, (1.0, 30.0), generator=g).unbind(0)

    def inner(m, n):
        return minkowski_inner(_hope_point(q_s, m, c), _hope_point(k_s, n, c)).item()

    for m, n in [(0, 0), (0, 3), (5, 2), (1, 17), (40, 7)]:
        expected = inner(m, n)
        for shift in (1, 13, 250, 4097):
            got = inner(m + shift, n + shift)
            assert abs(got - expected) <= 1e-10 * max(1.0, abs(expected)), (m, n, shift)
    values = [inner(0, d) for d in range(6)]
    assert max(values) - min(values) > 1e-3, "the rotation has no effect"


def test_hope_rotation_preserves_space_norm_and_time():
    """Rotating the space part keeps |x_s|, so the lifted point's time coordinate is unchanged."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    space = random_space((2, 9, HEADS), HEAD_SPACE, (1.0, 30.0), generator=g)  # (B, N, H, d)
    cos, sin = rotary_tables(torch.arange(100, 109).expand(2, -1), HEAD_SPACE, 10000.0, torch.float64)
    rotated = apply_rotary(space, cos, sin)
    assert not torch.allclose(rotated, space)
    torch.testing.assert_close(rotated.norm(dim=-1), space.norm(dim=-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(lift(rotated, 1.0)[..., 0], lift(space, 1.0)[..., 0], rtol=1e-13, atol=0)


def test_rotary_is_rope_on_adjacent_pairs():
    """apply_rotary rotates pair (2i, 2i+1) by position * base^(-2i/d) (independent per-pair computation)."""
    torch.manual_seed(0)
    d, base, positions = 8, 500.0, [0, 3, 11]
    x = torch.randn(1, len(positions), 1, d, dtype=torch.float64)
    cos, sin = rotary_tables(torch.tensor([positions]), d, base, torch.float64)
    got = apply_rotary(x, cos, sin)
    for t, pos in enumerate(positions):
        for i in range(d // 2):
            angle = pos * base ** (-2 * i / d)
            a, b = x[0, t, 0, 2 * i].item(), x[0, t, 0, 2 * i + 1].item()
            assert got[0, t, 0, 2 * i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-12)
            assert got[0, t, 0, 2 * i + 1].item() == pytest.approx(a * math.sin(angle) + b * math.cos(angle),
                                                                   abs=1e-12)


def test_rotary_tables_rejects_odd_dim():
    """rotary_tables refuses an odd rotary dim and names it."""
    with pytest.raises(ValueError, match=r"rotary dim must be even, got 15"):
        rotary_tables(torch.arange(4).unsqueeze(0), 15, 10000.0, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Every Lorentz layer maps onto the hyperboloid
# ---------------------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64]


def _inputs(c, norms, dtype, seed=0, shape=(2, 7), space_dim=SPACE):
    return lorentz_points(shape, space_dim, c, norms, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_lorentz_linear_output_on_manifold(c, dtype):
    """LorentzLinear lifts W x + b onto the hyperboloid, at normalised and at residual-stream input norms."""
    torch.manual_seed(0)
    layer = LorentzLinear(WIDTH, SPACE, curvature=c).to(dtype)
    for norms in (NORMED_NORMS, RESIDUAL_NORMS):
        out = layer(_inputs(c, norms, dtype))
        assert out.shape == (2, 7, WIDTH) and out.dtype == dtype
        # fp32: at residual norms the output reaches |s| ~ 1e2, where rounding of x_t alone is ~1e-7 x_t^2; judge
        # it relative to the coordinates' scale there.
        tol = VIOLATION_TOL[dtype]
        rel = "curvature" if norms is NORMED_NORMS else "scale"
        assert manifold_violation(out, c, relative_to=rel).max().item() <= (tol if rel == "curvature" else 1e-6)


def test_gemm_pad_and_lorentz_init():
    """gemm_pad rounds widths up to a multiple of 8; lorentz_init_ is nn.init.xavier_uniform_(gain sqrt 2) on a
    matrix, and on a stack of matrices it uses each matrix's own fans."""
    assert [gemm_pad(n) for n in (1, 7, 8, 9, 259, 1039, 1040)] == [7, 1, 0, 7, 5, 1, 0]
    torch.manual_seed(0)
    ours = lorentz_init_(torch.empty(33, 34))
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.init.xavier_uniform_(torch.empty(33, 34), gain=math.sqrt(2)))
    stack = lorentz_init_(torch.empty(4, 40, 10))
    bound = math.sqrt(2) * math.sqrt(6 / 50)
    assert stack.abs().max() <= bound and stack.abs().max() > 0.9 * bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_lorentz_rmsnorm_output_on_manifold(c, dtype):
    """LorentzRMSNorm output is on the hyperboloid for residual-stream inputs."""
    torch.manual_seed(0)
    norm = LorentzRMSNorm(SPACE, curvature=c).to(dtype)
    out = norm(_inputs(c, RESIDUAL_NORMS, dtype))
    assert out.dtype == dtype
    assert violation(out, c) <= VIOLATION_TOL[dtype]


def _residual_variants(c):
    return {
        "learnable_weight": LorentzResidual(curvature=c),
        "fixed_scale": LorentzResidual(scale=RESIDUAL_SCALE, curvature=c),
        "learnable_log_scale": LorentzResidual(scale=RESIDUAL_SCALE, learn_scale=True, curvature=c),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_lorentz_residual_output_on_manifold(c, dtype):
    """LorentzResidual (learnable weight, fixed scale, learnable log-scale, per-call weights) stays on the
    hyperboloid for residual-stream x and normalised-size y."""
    torch.manual_seed(0)
    x = _inputs(c, RESIDUAL_NORMS, dtype, seed=1)
    y = _inputs(c, NORMED_NORMS, dtype, seed=2)
    # Per-token weights of order 1 (as the learnable weight's init); much smaller weights leave z ~ x / |<a,a>|^.5
    # with |z_s| ~ 5 and, after the scale, |s| ~ 150, where fp32 rounding alone exceeds 1e-3 * c.
    per_token = torch.rand(2, 7, 1, generator=torch.Generator().manual_seed(3), dtype=dtype) + 0.5
    for name, module in _residual_variants(c).items():
        module = module.to(dtype)
        for weight in (None, per_token):
            out = module(x, y, weight=weight)
            assert out.shape == x.shape and out.dtype == dtype, name
            assert violation(out, c) <= VIOLATION_TOL[dtype], (name, weight is None)
            assert manifold_violation(out, c, relative_to="scale").max().item() <= 1e-6, name


def test_lorentz_residual_scale_sets_the_magnitude():
    """With scale s, |out_s| = s * |z_s| for z the (independently computed) normalised weighted sum; the direction
    is z_s's; a learnable log-scale acts as exp(log_scale); a per-call weight replaces the learnable one."""
    torch.manual_seed(0)
    c = 2.0
    x = _inputs(c, RESIDUAL_NORMS, torch.float64, seed=1)
    y = _inputs(c, NORMED_NORMS, torch.float64, seed=2)

    def normalised_sum(w):
        a = x + w * y
        return math.sqrt(c) * a / (a[..., :1] ** 2 - a[..., 1:].square().sum(-1, keepdim=True)).sqrt()

    fixed = LorentzResidual(scale=RESIDUAL_SCALE, curvature=c).double()
    with torch.no_grad():
        fixed.weight.fill_(0.7)
    z = normalised_sum(0.7)
    out = fixed(x, y)
    torch.testing.assert_close(out[..., 1:].norm(dim=-1), RESIDUAL_SCALE * z[..., 1:].norm(dim=-1),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(F.normalize(out[..., 1:], dim=-1), F.normalize(z[..., 1:], dim=-1),
                               rtol=1e-12, atol=1e-12)
    # The scale really changes the magnitude (it is not a no-op on an already-large point).
    assert (out[..., 1:].norm(dim=-1) / z[..., 1:].norm(dim=-1)).min().item() > 10

    # No scale: the output is exactly the normalised sum (the weighted Lorentzian centroid).
    torch.testing.assert_close(LorentzResidual(weight=0.7, curvature=c).double()(x, y), z, rtol=1e-12, atol=1e-12)

    learned = LorentzResidual(scale=RESIDUAL_SCALE, learn_scale=True, curvature=c).double()
    assert learned.log_scale is not None and learned.log_scale.requires_grad
    with torch.no_grad():
        learned.log_scale.fill_(math.log(3.0))
    out = learned(x, y)
    torch.testing.assert_close(out[..., 1:].norm(dim=-1), 3.0 * normalised_sum(1.0)[..., 1:].norm(dim=-1),
                               rtol=1e-12, atol=0)
    out[..., 0].sum().backward()  # the log-scale and the weight are trained
    assert learned.log_scale.grad.abs().item() > 0 and learned.weight.grad.abs().item() > 0

    per_token = torch.rand(2, 7, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    unscaled = LorentzResidual(curvature=c).double()
    torch.testing.assert_close(unscaled(x, y, weight=per_token), normalised_sum(per_token), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lorentz_feedforward_output_on_manifold(dtype):
    """HFFN output is on its own hyperboloid, and on the per-call curvature's hyperboloid when one is given."""
    torch.manual_seed(0)
    ffn = LorentzFeedForward(WIDTH, 2 * WIDTH, curvature=1.0).to(dtype)
    out = ffn(_inputs(1.0, NORMED_NORMS, dtype))
    assert out.shape == (2, 7, WIDTH) and out.dtype == dtype
    assert violation(out, 1.0) <= VIOLATION_TOL[dtype]

    expert_c = torch.tensor(2.5, dtype=dtype, requires_grad=True)  # a learnable expert curvature
    out = ffn(_inputs(2.5, NORMED_NORMS, dtype), curvature=expert_c)
    assert violation(out, 2.5) <= VIOLATION_TOL[dtype]
    assert violation(out, 1.0) > 1.0, "output is on the module's default hyperboloid, not the per-call one"
    (grad,) = torch.autograd.grad(out[..., 0].sum(), expert_c)
    assert torch.isfinite(grad) and grad.abs().item() > 0


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_lorentz_self_attention_output_on_manifold(c, dtype, masked):
    """LorentzSelfAttention (HoPE + SDPA + output map) returns points on the hyperboloid."""
    torch.manual_seed(0)
    attn = LorentzSelfAttention(WIDTH, HEADS, curvature=c).to(dtype)
    x = _inputs(c, NORMED_NORMS, dtype, shape=(2, 20))
    cos, sin = rotary_tables(torch.arange(20).unsqueeze(0), HEAD_SPACE, 10000.0, dtype)
    mask = document_causal_mask(packed_document_ids(DOC_LENGTHS)) if masked else None
    out = attn(x, cos, sin, mask)
    assert out.shape == (2, 20, WIDTH) and out.dtype == dtype
    assert violation(out, c) <= VIOLATION_TOL[dtype]


@pytest.mark.parametrize("manifold_table", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_lorentz_embedding_output_on_manifold(c, dtype, manifold_table):
    """LorentzEmbedding lookups (manifold table or lifted Euclidean table) are points on the hyperboloid."""
    torch.manual_seed(0)
    emb = LorentzEmbedding(97, SPACE, curvature=c, manifold_table=manifold_table).to(dtype)
    emb.reset_parameters()  # re-initialise in the table's dtype (an fp32 init cast to fp64 is only fp32-accurate)
    ids = torch.randint(0, 97, (2, 11))
    out = emb(ids)
    assert out.shape == (2, 11, WIDTH) and out.dtype == dtype
    assert violation(out, c) <= VIOLATION_TOL[dtype]
    if manifold_table:
        assert torch.equal(out, emb.weight[ids])
    else:
        assert torch.equal(out[..., 1:], emb.weight[ids])


# ---------------------------------------------------------------------------------------------------------------
# Layer formulas and initialisation
# ---------------------------------------------------------------------------------------------------------------
def test_lorentz_rmsnorm_matches_formula_and_space_only():
    """Space part = g * x_s / sqrt(mean(x_s^2) + eps) (independent formula), time = sqrt(|s|^2 + c), and
    space_only=True on x_s gives the same point as the full x."""
    torch.manual_seed(0)
    c, eps = 2.0, 1e-6
    norm = LorentzRMSNorm(SPACE, eps=eps, curvature=c).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(SPACE, dtype=torch.float64) * 2 + 0.1)
    x = _inputs(c, RESIDUAL_NORMS, torch.float64)
    x_s = x[..., 1:]
    expected_space = norm.weight * x_s / (x_s.square().mean(-1, keepdim=True) + eps).sqrt()
    out = norm(x)
    torch.testing.assert_close(out[..., 1:], expected_space, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[..., 0], (expected_space.square().sum(-1) + c).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(norm(x_s, space_only=True), out, rtol=0, atol=0)


def test_lorentz_embedding_manifold_table_init():
    """manifold_table=True stores a geoopt ManifoldParameter on Lorentz(k=c) whose rows are hyperboloid points at
    geodesic distance 1 from the origin, in varied directions."""
    torch.manual_seed(0)
    c = 2.0
    emb = LorentzEmbedding(97, SPACE, curvature=c, manifold_table=True)
    weight = emb.weight
    assert isinstance(weight, geoopt.ManifoldParameter)
    assert isinstance(weight.manifold, geoopt.Lorentz)
    assert weight.manifold.k.item() == pytest.approx(c)
    assert weight.shape == (97, WIDTH)
    assert violation(weight, c) <= 1e-5
    radius = distance(weight.detach(), origin(SPACE, c), c)
    torch.testing.assert_close(radius, torch.ones_like(radius), rtol=0, atol=1e-5)
    directions = F.normalize(weight.detach()[:, 1:], dim=-1)
    cosines = directions @ directions.T - torch.eye(97)
    assert cosines.abs().max().item() < 0.95, "rows share a direction"


def test_lorentz_embedding_euclidean_table_is_plain_parameter():
    """manifold_table=False stores a plain Parameter of space parts (the reference's project_emb)."""
    torch.manual_seed(0)
    emb = LorentzEmbedding(97, SPACE, curvature=1.0, manifold_table=False)
    assert not isinstance(emb.weight, geoopt.ManifoldParameter)
    assert emb.weight.shape == (97, SPACE)


# ---------------------------------------------------------------------------------------------------------------
# document_causal_mask
# ---------------------------------------------------------------------------------------------------------------
def test_document_causal_mask_is_causal_within_documents():
    """The mask is (B, 1, N, N) bool, True exactly where j <= i and tokens i, j share a document."""
    torch.manual_seed(0)
    doc_ids = torch.cat([packed_document_ids(DOC_LENGTHS), torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 4,
                                                                            4, 4, 4, 4, 5, 5, 5]])])
    mask = document_causal_mask(doc_ids)
    b, n = doc_ids.shape
    assert mask.shape == (b, 1, n, n) and mask.dtype == torch.bool
    for row in range(b):
        for i in range(n):
            for j in range(n):
                expected = j <= i and doc_ids[row, i].item() == doc_ids[row, j].item()
                assert mask[row, 0, i, j].item() is expected, (row, i, j)
