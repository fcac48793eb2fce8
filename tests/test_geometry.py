"""Property tests for the Lorentz-model functions in :mod:`helmlm.geometry.lorentz`.

Every test checks an identity or a property of the hyperboloid (never a golden number), across seeds, fp32/fp64,
several curvatures ``c`` and vectors whose norms span 1e-6 .. 1e3. Convention: ``x = (x_t, x_s)``,
``<x, x>_L = -x_t^2 + |x_s|^2 = -c``, ``x_t > 0``; geoopt's ``Lorentz(k)`` uses the same convention with ``k == c``.
"""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from torch.autograd import gradcheck

from helmlm.geometry import (
    centroid,
    distance,
    expmap0,
    lift,
    logmap0,
    lorentz_normalize,
    manifold_violation,
    max_radius,
    minkowski_inner,
    minkowski_sign,
    origin,
    project,
    promote,
    rescale_curvature,
    sq_distance,
    time_from_space,
)

# ---------------------------------------------------------------------------------------------------------------------
# Parameters and tolerances
# ---------------------------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
DTYPES = (torch.float32, torch.float64)
CURVATURES = (0.3, 1.0, 2.5)
SPACE_DIM = 8
# Log-spaced norms 1e-6 .. 1e3 (half-decade steps); every test vector has one of these norms and a random direction.
NORMS = tuple(10.0 ** (k / 2) for k in range(-12, 7))

# Scale-relative tolerance, |<x,x>_L + c| / x_t^2 and relative errors of well-conditioned identities. Each operation
# under test is a handful of correctly rounded steps (a sum of squares, a sqrt, a sinh/asinh, a product), so its
# results are accurate to a few ulp: measured ~1 ulp (1.5e-7 fp32, 2e-16 fp64) for lift/expmap0. fp32 eps is 1.2e-7
# and fp64 eps is 2.2e-16, so 1e-5 / 1e-12 leave ~100x / ~5000x headroom for error growth in composed maps (round
# trips, centroids of up to 8 points) while still failing on any real formula error (those are O(1) or O(r^2)).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Curvature-relative checks (|<x,x>_L + c| / c) are only meaningful while x_t^2 / c is moderate: storing x_t in a
# dtype of unit roundoff eps alone contributes ~eps * x_t^2 / c. Up to KAPPA_MAX the same TOL applies.
KAPPA_MAX = 10.0
# Tolerance against geoopt (fp64, moderate norms): both libraries are accurate to ~1e-15 there.
GEOOPT_RTOL = 1e-10

grid = pytest.mark.parametrize("c", CURVATURES)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
seeds = pytest.mark.parametrize("seed", SEEDS)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def random_vectors(norms, seed: int, dtype: torch.dtype, dim: int = SPACE_DIM) -> torch.Tensor:
    """One row per entry of ``norms``: a uniformly random direction scaled to exactly that norm (built in fp64)."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.as_tensor(norms, dtype=torch.float64)
    d = torch.randn(len(norms), dim, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    return (d * norms[:, None]).to(dtype)


def random_points(norms, seed: int, dtype: torch.dtype, c: float) -> torch.Tensor:
    """Hyperboloid points ``lift(s)`` whose space parts have the given norms."""
    return lift(random_vectors(norms, seed, dtype), c)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise relative error ``|a - b| / |b|`` over the last axis, computed in fp64."""
    a, b = a.double(), b.double()
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def assert_finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert torch.isfinite(t).all(), f"non-finite values in {t}"


def assert_on_manifold(x: torch.Tensor, c, dtype: torch.dtype) -> None:
    """Finite, upper sheet, scale-relative violation < TOL everywhere, c-relative violation < TOL where x_t^2/c is
    moderate (<= KAPPA_MAX)."""
    assert_finite(x)
    assert x.dtype == dtype
    assert (x[..., 0] > 0).all()
    scale = manifold_violation(x, c, relative_to="scale")
    assert scale.max() < TOL[dtype], f"scale-relative violation {scale.max():.3e}"
    c64 = float(c)
    kappa = x[..., 0].double().square() / c64
    moderate = kappa <= KAPPA_MAX
    if moderate.any():
        curv = manifold_violation(x, c)[moderate]
        assert curv.max() < TOL[dtype], f"c-relative violation {curv.max():.3e}"


def within_radius(norms, c: float, dtype: torch.dtype, limit: float | None = None):
    """The norms whose geodesic radius |u|/sqrt(c) is at most ``limit`` (default: max_radius(dtype))."""
    limit = max_radius(dtype) if limit is None else limit
    return [n for n in norms if n / math.sqrt(c) <= limit]


def curvature_tensor(c: float) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float64, requires_grad=True)


# ---------------------------------------------------------------------------------------------------------------------
# manifold_violation itself (so that the manifold checks below are not vacuous)
# ---------------------------------------------------------------------------------------------------------------------


@dtypes
@grid
def test_manifold_violation_detects_off_manifold_points(dtype, c):
    """The checker is ~0 on lifted points but large when the time is perturbed, and rejects unknown modes."""
    x = random_points([0.1, 1.0, 10.0], 0, dtype, c)
    off = x.clone()
    off[..., 0] *= 1.01
    assert manifold_violation(x, c, relative_to="scale").max() < TOL[dtype]
    assert manifold_violation(off, c, relative_to="scale").min() > 1e-3
    assert manifold_violation(off, c).min() > 1e-3
    with pytest.raises(ValueError):
        manifold_violation(x, c, relative_to="norm")


def test_manifold_violation_is_inf_on_lower_sheet():
    """A point with negative time (on the lower sheet, where <x,x>_L = -c still holds) reports inf."""
    x = random_points([0.5, 2.0], 0, torch.float64, 1.0)
    x[..., 0] = -x[..., 0]
    assert torch.isinf(manifold_violation(x, 1.0)).all()
    assert torch.isinf(manifold_violation(x, 1.0, relative_to="scale")).all()


# ---------------------------------------------------------------------------------------------------------------------
# origin, minkowski_inner, time_from_space, lift, project
# ---------------------------------------------------------------------------------------------------------------------


@dtypes
@grid
def test_origin_on_manifold_with_zero_space(dtype, c):
    """origin = (sqrt(c), 0, ..., 0): on the hyperboloid, zero space part, requested dtype."""
    o = origin(SPACE_DIM, c, dtype=dtype)
    assert o.shape == (SPACE_DIM + 1,)
    assert (o[1:] == 0).all()
    assert_on_manifold(o, c, dtype)
    torch.testing.assert_close(o[0], torch.tensor(math.sqrt(c), dtype=dtype))


@seeds
@dtypes
@grid
def test_lift_matches_time_from_space(seed, dtype, c):
    """lift(s) = (time_from_space(s), s): space part kept bit-exactly, time positive, point on the manifold."""
    s = random_vectors(NORMS, seed, dtype)
    x = lift(s, c)
    t = time_from_space(s, c)
    assert x.shape == (len(NORMS), SPACE_DIM + 1) and t.shape == (len(NORMS), 1)
    assert torch.equal(x[..., 1:], s)
    assert torch.equal(x[..., :1], t)
    assert_on_manifold(x, c, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lift_concat_is_lift_of_the_concatenation_padded(dtype):
    """``lift_concat`` (keys and values of HMLA): the bits of ``F.pad(lift(cat(parts)))`` recorded and not, with a
    broadcast (expanded) part; in fp64 the gradients of every part and of a learned curvature match the plain ops',
    gradcheck passes; the node keeps only its output; a width too small is refused."""
    from torch.nn import functional as F

    from helmlm.geometry import lift_concat
    from helmlm.geometry.lorentz import _LiftConcat

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 3, 4, dtype=dtype, generator=gen).mul(3).requires_grad_()
    b_shared = torch.randn(2, 5, 1, 2, dtype=dtype, generator=gen).requires_grad_()
    c = torch.tensor(0.7, dtype=dtype, requires_grad=True)

    def plain(a_, b_, c_):
        return F.pad(lift(torch.cat([a_, b_.expand(-1, -1, 3, -1)], dim=-1), c_), (0, 2))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        got = lift_concat([a, b_shared.expand(-1, -1, 3, -1)], c, width=9)
    assert got.grad_fn.name().startswith("_LiftConcat") and saved == [got.shape]
    want = plain(a, b_shared, c)
    assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(lift_concat([a, b_shared.expand(-1, -1, 3, -1)], c, width=9), want)
    assert torch.equal(lift_concat([a], c), lift(a, c))
    with pytest.raises(ValueError, match="width 6 is less than"):
        lift_concat([a, b_shared.expand(-1, -1, 3, -1)], c, width=6)
    if dtype == torch.float64:
        upstream = torch.randn(want.shape, dtype=dtype, generator=gen)
        inputs = (a, b_shared, c)
        for x, y in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)
        assert gradcheck(lambda c_, a_, b_: _LiftConcat.apply(c_, 9, a_, b_.expand(-1, -1, 3, -1)),
                         (c, a, b_shared))


@seeds
@dtypes
@grid
def test_minkowski_self_inner_is_minus_c(seed, dtype, c):
    """<x, x>_L == -c for lifted and exp-mapped points (to TOL relative to the size x_t^2 of the cancelling terms)."""
    for x in (random_points(NORMS, seed, dtype, c), expmap0(random_vectors(NORMS, seed + 100, dtype), c)):
        inner = minkowski_inner(x, x)
        assert inner.shape == x.shape[:-1] and inner.dtype == dtype
        err = (inner.double() + c).abs() / x[..., 0].double().square()
        assert err.max() < TOL[dtype]
    # Bilinear and symmetric: <x, y> == <y, x>, keepdim keeps a trailing axis.
    x, y = random_points(NORMS, seed, dtype, c), random_points(NORMS, seed + 1, dtype, c)
    torch.testing.assert_close(minkowski_inner(x, y), minkowski_inner(y, x), rtol=0, atol=0)
    assert minkowski_inner(x, y, keepdim=True).shape == (len(NORMS), 1)


@seeds
@dtypes
@grid
def test_project_lands_on_manifold_and_keeps_space(seed, dtype, c):
    """project recomputes the time: the result is on the manifold, keeps x_s, and fixes on-manifold points."""
    x = random_points(NORMS, seed, dtype, c)
    g = torch.Generator().manual_seed(seed)
    off = x.clone()
    off[..., 0] = off[..., 0] * (0.5 + torch.rand(len(NORMS), generator=g, dtype=torch.float64).to(dtype))
    p = project(off, c)
    assert_on_manifold(p, c, dtype)
    assert torch.equal(p[..., 1:], x[..., 1:])
    assert rel_err(project(x, c), x).max() < TOL[dtype]


# ---------------------------------------------------------------------------------------------------------------------
# expmap0 / logmap0
# ---------------------------------------------------------------------------------------------------------------------


@seeds
@dtypes
@grid
def test_expmap0_on_manifold(seed, dtype, c):
    """expmap0 maps tangent vectors of every norm (1e-6 .. 1e3, some beyond max_radius) onto the hyperboloid."""
    u = random_vectors(NORMS, seed, dtype)
    x = expmap0(u, c)
    assert x.shape == (len(NORMS), SPACE_DIM + 1)
    assert_on_manifold(x, c, dtype)


@seeds
@dtypes
@grid
def test_logmap0_inverts_expmap0(seed, dtype, c):
    """logmap0(expmap0(u)) == u for every radius |u|/sqrt(c) up to max_radius (relative error < TOL)."""
    norms = within_radius(NORMS, c, dtype) + [0.999 * max_radius(dtype) * math.sqrt(c)]
    u = random_vectors(norms, seed, dtype)
    back = logmap0(expmap0(u, c), c)
    assert_finite(back)
    assert back.dtype == dtype
    assert rel_err(back, u).max() < TOL[dtype]


@seeds
@dtypes
@grid
def test_expmap0_inverts_logmap0(seed, dtype, c):
    """expmap0(logmap0(x)) == x for points x = lift(s) with |s| from 1e-6 to 1e3."""
    x = random_points(NORMS, seed, dtype, c)
    v = logmap0(x, c)
    assert v.shape == (len(NORMS), SPACE_DIM)
    assert_finite(v)
    assert rel_err(expmap0(v, c), x).max() < TOL[dtype]


@dtypes
@grid
def test_expmap0_clamps_beyond_max_radius(dtype, c):
    """Radii beyond max_radius give finite points on the manifold at exactly the clamped radius, in u's direction."""
    r_max = max_radius(dtype)
    norms = [f * r_max * math.sqrt(c) for f in (1.0001, 1.5, 10.0, 1e3, 1e6)]
    u = random_vectors(norms, 0, dtype)
    x = expmap0(u, c)
    assert_on_manifold(x, c, dtype)
    v = logmap0(x, c).double()
    radius = v.norm(dim=-1) / math.sqrt(c)
    torch.testing.assert_close(radius, torch.full_like(radius, r_max), rtol=TOL[dtype], atol=0)
    cos = (v * u.double()).sum(-1) / (v.norm(dim=-1) * u.double().norm(dim=-1))
    assert (1 - cos).abs().max() < TOL[dtype]


@dtypes
def test_expmap0_clamp_survives_overflowing_norm(dtype):
    """Even a tangent vector whose squared norm overflows maps to the max-radius point in its direction."""
    huge = 1e20 if dtype == torch.float32 else 1e160
    u = random_vectors([huge], 0, dtype)
    v = logmap0(expmap0(u, 1.0), 1.0)
    assert_finite(v)
    torch.testing.assert_close(v.double().norm(dim=-1), torch.tensor([max_radius(dtype)], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------------------------------


@seeds
@dtypes
@grid
def test_distance_symmetric_nonnegative_zero_diagonal(seed, dtype, c):
    """Pairwise distances over all norms: finite, symmetric, >= 0, and exactly 0 from a point to itself."""
    x = random_points(NORMS, seed, dtype, c)
    d = distance(x[:, None, :], x[None, :, :], c)
    d2 = sq_distance(x[:, None, :], x[None, :, :])
    assert_finite(d, d2)
    assert d.dtype == dtype and d.shape == (len(NORMS), len(NORMS))
    assert (d >= 0).all() and (d2 >= 0).all()
    torch.testing.assert_close(d, d.T, rtol=4 * eps_of(dtype), atol=0)
    torch.testing.assert_close(d2, d2.T, rtol=4 * eps_of(dtype), atol=0)
    assert (torch.diagonal(d) == 0).all() and (torch.diagonal(d2) == 0).all()
    assert (distance(x, x, c) == 0).all()


# Radii for the tight (TOL) isometry check; larger radii, up to 0.9 max_radius, are covered by
# test_distance_far_from_origin.
ISOMETRY_RADIUS = {torch.float32: 5.0, torch.float64: 12.0}


@seeds
@dtypes
@grid
def test_expmap0_is_radial_isometry(seed, dtype, c):
    """distance(o, expmap0(u)) == |u|: expmap0 is a radial isometry (radii from 1e-6 up to ISOMETRY_RADIUS)."""
    norms = within_radius(NORMS, c, dtype, ISOMETRY_RADIUS[dtype])
    u = random_vectors(norms, seed, dtype)
    o = origin(SPACE_DIM, c, dtype=dtype)
    d = distance(o, expmap0(u, c), c)
    assert_finite(d)
    expected = u.double().norm(dim=-1)
    assert ((d.double() - expected).abs() / expected).max() < TOL[dtype]


@dtypes
@grid
@pytest.mark.parametrize("fraction", (0.5, 0.9))
def test_distance_far_from_origin(dtype, c, fraction):
    """distance(o, expmap0(u)) == |u| also for large radii (half and 0.9 of max_radius)."""
    radius = fraction * max_radius(dtype)
    u = random_vectors([radius * math.sqrt(c)] * 6, 0, dtype)
    d = distance(origin(SPACE_DIM, c, dtype=dtype), expmap0(u, c), c)
    expected = u.double().norm(dim=-1)
    assert ((d.double() - expected).abs() / expected).max() < 1e-4


@seeds
@dtypes
@grid
def test_sq_distance_matches_inner_product_formula(seed, dtype, c):
    """sq_distance == -2c - 2<x,y>_L (evaluated in fp64 on the stored points) for all pairs of norms.

    Both forms are sums of terms of size up to x_t^2 + y_t^2, so the comparison is made relative to that scale, where
    both are well conditioned; distance() must equal 2 sqrt(c) asinh(sqrt(d2) / (2 sqrt(c))) of that d2."""
    x = random_points(NORMS, seed, dtype, c)
    y = random_points(NORMS[::-1], seed + 1, dtype, c)
    xx, yy = x[:, None, :], y[None, :, :]
    ref = -2 * c - 2 * minkowski_inner(xx.double(), yy.double())
    scale = xx[..., 0].double().square() + yy[..., 0].double().square()
    d2 = sq_distance(xx, yy)
    assert d2.dtype == dtype
    assert ((d2.double() - ref).abs() / scale).max() < TOL[dtype]
    # Moderate norms (|s| in 1e-2 .. 3, so pairwise d2 >~ 1e-4 while the terms are <~ 20): relative agreement on d2
    # itself and distance == sqrt(c) arcosh(-<x,y>_L / c). Conditioning (terms / d2) is <~ 1e5, hence 100x TOL.
    m = random_points([n for n in NORMS if 1e-2 <= n <= 3], seed + 2, dtype, c)
    mm, nn = m[:, None, :], m[None, :, :]
    off_diag = ~torch.eye(len(m), dtype=torch.bool)
    inner = minkowski_inner(mm.double(), nn.double())[off_diag]
    ref_d2 = -2 * c - 2 * inner
    assert ((sq_distance(mm, nn).double()[off_diag] - ref_d2).abs() / ref_d2).max() < 100 * TOL[dtype]
    ref_d = math.sqrt(c) * torch.acosh(-inner / c)
    assert ((distance(mm, nn, c).double()[off_diag] - ref_d).abs() / ref_d).max() < 100 * TOL[dtype]


@seeds
@dtypes
@grid
def test_triangle_inequality(seed, dtype, c):
    """d(x, z) <= d(x, y) + d(y, z) on all triples of 16 random points (norms 1e-3 .. 10)."""
    norms = [n for n in NORMS if 1e-3 <= n <= 10] * 2
    p = random_points(norms, seed, dtype, c)
    d = distance(p[:, None, :], p[None, :, :], c).double()
    lhs = d[:, None, :]  # d(x, z) indexed [x, y, z]
    rhs = d[:, :, None] + d[None, :, :]  # d(x, y) + d(y, z)
    assert (lhs <= rhs * (1 + TOL[dtype]) + TOL[dtype] * 1e-3).all()


def test_distance_gradient_finite_on_diagonal():
    """Backpropagating through distance(x, x) gives finite gradients (like sq_distance and expmap0 at 0)."""
    x = random_points([0.5, 2.0], 0, torch.float64, 1.0).requires_grad_(True)
    distance(x, x.detach().clone(), 1.0).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------------------------
# centroid / lorentz_normalize
# ---------------------------------------------------------------------------------------------------------------------


def point_sets(seed: int, dtype: torch.dtype, c: float, sets: int = 5, size: int = 4) -> torch.Tensor:
    """``sets`` groups of ``size`` points (shape (sets, size, D)) with norms drawn from the whole 1e-6 .. 1e3 range."""
    g = torch.Generator().manual_seed(seed + 1000)
    idx = torch.randint(len(NORMS), (sets * size,), generator=g)
    return random_points([NORMS[i] for i in idx], seed, dtype, c).reshape(sets, size, SPACE_DIM + 1)


def random_weights(seed: int, shape, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2000)
    return torch.rand(*shape, generator=g, dtype=torch.float64).add(0.05).to(dtype)


def normalisation_tol(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row tolerance for results of lorentz_normalize(a) (centroids): rounding a to ``dtype`` perturbs
    <a, a>_L by ~eps * a_t^2, and the result is rescaled by sqrt(c / |<a, a>_L|), so its relative error is bounded by
    ~eps * kappa with the condition number kappa = a_t^2 / |<a, a>_L| (= x_t^2 / c for a point x). TOL plus 8x that
    (measured errors are <= ~0.5 eps * kappa)."""
    a = a.detach().double()
    kappa = a[..., 0].square() / minkowski_inner(a, a).abs()
    return TOL[dtype] + 8 * eps_of(dtype) * kappa


@seeds
@dtypes
@grid
def test_centroid_on_manifold(seed, dtype, c):
    """Uniform and weighted centroids of points of all norms lie on the hyperboloid (scale-relative)."""
    x = point_sets(seed, dtype, c)
    mu = centroid(x, c)
    assert mu.shape == (5, SPACE_DIM + 1)
    assert_on_manifold(mu, c, dtype)
    w = random_weights(seed, (5, 3, 4), dtype)
    mu_w = centroid(x, c, w)
    assert mu_w.shape == (5, 3, SPACE_DIM + 1)
    assert_on_manifold(mu_w, c, dtype)


@seeds
@dtypes
@grid
def test_centroid_of_identical_points_is_the_point(seed, dtype, c):
    """The centroid of M copies of x is x (error bounded by the conditioning eps * x_t^2 / c of re-normalising x)."""
    x = random_points(NORMS, seed, dtype, c)
    copies = x[:, None, :].expand(len(NORMS), 5, SPACE_DIM + 1)
    assert (rel_err(centroid(copies, c), x) <= normalisation_tol(x, dtype)).all()
    w = random_weights(seed, (len(NORMS), 2, 5), dtype)
    mu_w = centroid(copies, c, w)
    assert (rel_err(mu_w, x[:, None, :]) <= normalisation_tol(x, dtype)[:, None]).all()


@seeds
@dtypes
@grid
def test_centroid_one_hot_weights_select_point(seed, dtype, c):
    """Weight row e_i returns point x_i (up to the re-normalisation conditioning of x_i)."""
    x = point_sets(seed, dtype, c)
    w = torch.eye(4, dtype=dtype).expand(5, 4, 4)
    mu = centroid(x, c, w)
    assert mu.shape == x.shape
    assert (rel_err(mu, x) <= normalisation_tol(x, dtype)).all()


@seeds
@dtypes
@grid
def test_centroid_is_normalised_weighted_sum(seed, dtype, c):
    """centroid(x, c, w) == lorentz_normalize(w @ x) == sqrt(c) a / sqrt(|<a,a>_L|) (fp64 reference); uniform
    weights are the default; positive rescaling of the weights does not move the centroid."""
    x = point_sets(seed, dtype, c)
    w = random_weights(seed, (5, 3, 4), dtype)
    mu = centroid(x, c, w)
    torch.testing.assert_close(mu, lorentz_normalize(w @ x, c), rtol=TOL[dtype], atol=0)
    a = w.double() @ x.double()
    ref = math.sqrt(c) * a / minkowski_inner(a, a, keepdim=True).abs().sqrt()
    tol = normalisation_tol(a, dtype)
    assert (rel_err(mu, ref) <= tol).all()
    assert (rel_err(centroid(x, c, 7.0 * w), mu) <= tol).all()
    uniform = torch.full((5, 1, 4), 0.25, dtype=dtype)
    tol_u = normalisation_tol(x.double().mean(-2), dtype)
    assert (rel_err(centroid(x, c), centroid(x, c, uniform)[:, 0]) <= tol_u).all()


@seeds
@dtypes
@grid
def test_centroid_permutation_invariant(seed, dtype, c):
    """Permuting the points (and their weights) leaves the centroid unchanged (summation order only)."""
    x = point_sets(seed, dtype, c)
    w = random_weights(seed, (5, 3, 4), dtype)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    tol_u = normalisation_tol(x.double().mean(-2), dtype)
    assert (rel_err(centroid(x[:, perm], c), centroid(x, c)) <= tol_u).all()
    tol_w = normalisation_tol(w.double() @ x.double(), dtype)
    assert (rel_err(centroid(x[:, perm], c, w[..., perm]), centroid(x, c, w)) <= tol_w).all()


@seeds
@grid
def test_centroid_minimises_weighted_squared_distance(seed, c):
    """The Lorentzian centroid is the minimiser of sum_i w_i d2(mu, x_i) over the hyperboloid (fp64)."""
    x = random_points([0.1, 0.5, 1.0, 2.0, 4.0], seed, torch.float64, c)
    w = random_weights(seed, (5,), torch.float64)
    mu = centroid(x, c, w[None, :])[0]

    def cost(p):
        return (w * sq_distance(p[..., None, :], x)).sum(-1)

    g = torch.Generator().manual_seed(seed)
    nearby = expmap0(logmap0(mu, c) + 0.05 * torch.randn(64, SPACE_DIM, generator=g, dtype=torch.float64), c)
    assert (cost(nearby) > cost(mu)).all()


@seeds
@dtypes
@grid
def test_lorentz_normalize_on_manifold_and_scale_invariant(seed, dtype, c):
    """lorentz_normalize maps time-like vectors onto the hyperboloid, ignores positive scaling, fixes points."""
    x, y = random_points(NORMS, seed, dtype, c), random_points(NORMS[::-1], seed + 1, dtype, c)
    a = 0.3 * x + 1.7 * y
    z = lorentz_normalize(a, c)
    assert_on_manifold(z, c, dtype)
    assert (rel_err(lorentz_normalize(5.0 * a, c), z) <= normalisation_tol(a, dtype)).all()
    # Direction kept: z is a positive multiple of a.
    cos = (z.double() * a.double()).sum(-1) / (z.double().norm(dim=-1) * a.double().norm(dim=-1))
    assert (1 - cos).abs().max() < TOL[dtype]
    assert (rel_err(lorentz_normalize(x, c), x) <= normalisation_tol(x, dtype)).all()


# ---------------------------------------------------------------------------------------------------------------------
# change of curvature
# ---------------------------------------------------------------------------------------------------------------------


@seeds
@dtypes
@pytest.mark.parametrize("c1, c2", [(0.3, 2.5), (2.5, 1.0), (1.0, 0.3)])
def test_rescale_curvature_round_trip(seed, dtype, c1, c2):
    """rescale_curvature(x, c1, c2) is on the c2 hyperboloid and rescaling back returns x."""
    x = random_points(NORMS, seed, dtype, c1)
    y = rescale_curvature(x, c1, c2)
    assert_on_manifold(y, c2, dtype)
    assert rel_err(rescale_curvature(y, c2, c1), x).max() < TOL[dtype]


@seeds
@dtypes
@pytest.mark.parametrize("c1, c2", [(0.3, 2.5), (2.5, 1.0), (1.0, 0.3)])
def test_rescale_curvature_scales_distance(seed, dtype, c1, c2):
    """distance_c2(rescale(x), rescale(y)) == sqrt(c2 / c1) * distance_c1(x, y) (moderate norms)."""
    norms = [n for n in NORMS if 1e-3 <= n <= 3]
    x, y = random_points(norms, seed, dtype, c1), random_points(norms[::-1], seed + 1, dtype, c1)
    d1 = distance(x, y, c1).double()
    d2 = distance(rescale_curvature(x, c1, c2), rescale_curvature(y, c1, c2), c2).double()
    assert ((d2 - math.sqrt(c2 / c1) * d1).abs() / d2).max() < 10 * TOL[dtype]


# ---------------------------------------------------------------------------------------------------------------------
# precision policy and tensor curvature
# ---------------------------------------------------------------------------------------------------------------------


@grid
def test_bf16_inputs_are_promoted_to_fp32(c):
    """bf16 inputs are computed and returned in fp32 (bf16 cannot even hold c next to |x_s|^2 ~ 1e3-1e4)."""
    s = random_vectors(NORMS, 0, torch.float32).bfloat16()
    x = lift(s, c)
    assert x.dtype == torch.float32
    assert torch.equal(x[..., 1:], s.float())
    assert_on_manifold(x, c, torch.float32)
    assert expmap0(s, c).dtype == torch.float32
    assert_on_manifold(expmap0(s, c), c, torch.float32)
    assert logmap0(x.bfloat16(), c).dtype == torch.float32
    assert minkowski_inner(x.bfloat16(), x.bfloat16()).dtype == torch.float32
    # lorentz_normalize / centroid need time-like inputs; bf16-rounded points stay time-like only while the bf16
    # error in <x,x>_L (~4e-3 x_t^2) is below c, i.e. for |x_s| <~ 1.
    small = lift(random_vectors([n for n in NORMS if n <= 1], 1, torch.float32), c).bfloat16()
    assert_on_manifold(lorentz_normalize(small, c), c, torch.float32)
    assert_on_manifold(centroid(small, c), c, torch.float32)
    weights = random_weights(0, (2, len(small)), torch.bfloat16)
    assert_on_manifold(centroid(small, c, weights), c, torch.float32)


@dtypes
@grid
def test_tensor_curvature_matches_float(dtype, c):
    """A 0-d tensor curvature (in the input dtype, or fp64 for fp32 inputs) gives the same results as the float."""
    u = random_vectors(NORMS, 0, dtype)
    x = random_points(NORMS, 1, dtype, c)
    for ct in (torch.tensor(c, dtype=dtype), torch.tensor(c, dtype=torch.float64)):
        torch.testing.assert_close(expmap0(u, ct), expmap0(u, c), rtol=0, atol=0)
        torch.testing.assert_close(logmap0(x, ct), logmap0(x, c), rtol=0, atol=0)
        torch.testing.assert_close(lift(u, ct), lift(u, c), rtol=0, atol=0)
        torch.testing.assert_close(distance(x, x.flip(0), ct), distance(x, x.flip(0), c), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# gradients (fp64 gradcheck, including d/dc)
# ---------------------------------------------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _space(shape=(3, 5), scale: float = 0.7, seed: int = 0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)).requires_grad_(True)


def _points(c: float, shape=(3, 4), seed: int = 0) -> torch.Tensor:
    return lift(0.8 * torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), c).detach().requires_grad_(True)


def _gradcheck_cases():
    c = 0.7
    yield "expmap0", expmap0, (_space(), curvature_tensor(c))
    yield "logmap0", logmap0, (_points(c), curvature_tensor(c))
    yield "lift", lift, (_space(), curvature_tensor(c))
    yield "distance", distance, (_points(c, seed=1), _points(c, seed=2), curvature_tensor(c))
    yield "sq_distance", lambda x, y: sq_distance(x, y), (_points(c, seed=1), _points(c, seed=2))
    a = (_points(c, seed=1) + 0.5 * _points(c, seed=2)).detach().requires_grad_(True)
    yield "lorentz_normalize", lorentz_normalize, (a, curvature_tensor(c))
    w = torch.rand(3, 4, generator=_gen(3), dtype=torch.float64).add(0.1).requires_grad_(True)
    yield "centroid", lambda x, k, w: centroid(x, k, w), (_points(c, shape=(4, 4)), curvature_tensor(c), w)
    yield "rescale_curvature", rescale_curvature, (_points(c), curvature_tensor(c), curvature_tensor(1.9))
    # Taylor branches (r < 1e-3): norms ~1e-4, finite-difference step well inside the branch.
    yield "expmap0_taylor", expmap0, (_space(scale=5e-5), curvature_tensor(c))
    tiny = lift(5e-5 * torch.randn(3, 4, generator=_gen(4), dtype=torch.float64), c).detach().requires_grad_(True)
    yield "logmap0_taylor", logmap0, (tiny, curvature_tensor(c))
    # Clamped regime (radius > max_radius): still differentiable in u and c. The output (~e^350) is scaled to O(1)
    # so that finite-difference rounding noise (~eps |f| / step) stays below gradcheck's atol.
    scale = math.exp(-max_radius(torch.float64))
    yield "expmap0_clamped", lambda u, k: scale * expmap0(u, k), (_space(scale=500.0), curvature_tensor(c))


_GRADCHECK_CASES = list(_gradcheck_cases())


@pytest.mark.parametrize("name, fn, inputs", _GRADCHECK_CASES, ids=[case[0] for case in _GRADCHECK_CASES])
def test_gradcheck(name, fn, inputs):
    """Analytic gradients (w.r.t. every input, the curvature c included) match finite differences in fp64."""
    assert all(t.dtype == torch.float64 and t.requires_grad for t in inputs)
    if name == "expmap0_clamped":
        assert (inputs[0].detach().norm(dim=-1) / math.sqrt(0.7) > max_radius(torch.float64)).all()
    if name.endswith("taylor"):
        space = inputs[0].detach()[..., -4:] if name == "logmap0_taylor" else inputs[0].detach()
        assert (space.norm(dim=-1) / math.sqrt(0.7) < 1e-3).all()
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@grid
def test_expmap0_gradient_at_zero(c):
    """At u = 0 the Jacobian of expmap0 is finite and equals [0; I] (time stationary, space the identity), and
    d expmap0(0)/dc = (1 / (2 sqrt(c)), 0)."""
    u = torch.zeros(SPACE_DIM, dtype=torch.float64)
    ct = torch.tensor(c, dtype=torch.float64)
    ju, jc = torch.autograd.functional.jacobian(expmap0, (u, ct))
    assert torch.isfinite(ju).all() and torch.isfinite(jc).all()
    expected = torch.cat([torch.zeros(1, SPACE_DIM, dtype=torch.float64), torch.eye(SPACE_DIM, dtype=torch.float64)])
    torch.testing.assert_close(ju, expected, rtol=0, atol=1e-15)
    expected_c = torch.zeros(SPACE_DIM + 1, dtype=torch.float64)
    expected_c[0] = 0.5 / math.sqrt(c)
    torch.testing.assert_close(jc, expected_c)
    # Backward through a batch containing an exact zero row stays finite for fp32 too.
    u32 = torch.zeros(2, SPACE_DIM, requires_grad=True)
    c32 = torch.tensor(c, requires_grad=True)
    logmap0(expmap0(u32, c32), c32).sum().backward()
    assert torch.isfinite(u32.grad).all() and torch.isfinite(c32.grad)


# ---------------------------------------------------------------------------------------------------------------------
# agreement with geoopt (fp64, moderate norms)
# ---------------------------------------------------------------------------------------------------------------------

GEOOPT_NORMS = [n for n in NORMS if 1e-2 <= n <= 10]


def _geoopt(c: float) -> geoopt.manifolds.Lorentz:
    return geoopt.manifolds.Lorentz(k=torch.tensor(c, dtype=torch.float64))


@seeds
@grid
def test_expmap0_matches_geoopt(seed, c):
    """expmap0(u) == geoopt Lorentz(k=c).expmap0((0, u))."""
    u = random_vectors(GEOOPT_NORMS, seed, torch.float64)
    ambient = torch.cat([torch.zeros(len(u), 1, dtype=torch.float64), u], dim=-1)
    for project_ in (True, False):
        ref = _geoopt(c).expmap0(ambient, project=project_)
        assert rel_err(expmap0(u, c), ref).max() < GEOOPT_RTOL


@seeds
@grid
def test_logmap0_matches_geoopt(seed, c):
    """logmap0(x) == space part of geoopt Lorentz(k=c).logmap0(x) (whose time part is 0)."""
    x = random_points(GEOOPT_NORMS, seed, torch.float64, c)
    ref = _geoopt(c).logmap0(x)
    assert ref[..., 0].abs().max() < GEOOPT_RTOL * ref.norm(dim=-1).min()
    assert rel_err(logmap0(x, c), ref[..., 1:]).max() < GEOOPT_RTOL


@seeds
@grid
def test_distance_matches_geoopt(seed, c):
    """distance(x, y) == geoopt Lorentz(k=c).dist(x, y) on pairs of well-separated points."""
    x = random_points(GEOOPT_NORMS, seed, torch.float64, c)
    y = random_points(GEOOPT_NORMS[::-1], seed + 1, torch.float64, c)
    ref = _geoopt(c).dist(x, y)
    assert (ref > 1e-2).all()  # geoopt's arcosh clamps x^2 - 1 at 1e-15, so keep points apart
    assert ((distance(x, y, c) - ref).abs() / ref).max() < GEOOPT_RTOL


def test_promote_and_minkowski_sign():
    """promote lifts only bf16/fp16 (to fp32); minkowski_sign is (-1, 1, ..., 1) in the input's dtype."""
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)):
        assert promote(torch.ones(2, dtype=dtype)).dtype == expected
    x = torch.randn(3, 5, dtype=torch.float64)
    assert promote(x) is x
    sign = minkowski_sign(x)
    assert sign.dtype == torch.float64 and sign.tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close((x * x * sign).sum(-1), minkowski_inner(x, x), rtol=0, atol=0)
