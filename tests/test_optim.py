"""Optimizer split, weight-decay roles and the learning-rate schedule (helmlm.training.optim)."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from helmlm.geometry import manifold_violation
from helmlm.models import HELMConfig, HELMForCausalLM
from helmlm.training import build_optimizer, lr_multiplier, parameter_roles
from helmlm.training.optim import riemannian_lr


def tiny(**overrides) -> HELMForCausalLM:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=64, hidden_size=34, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=32, attention="mla", ffn="moe", kv_lora_rank=8, qk_nope_head_dim=9,
                  qk_rope_head_dim=9, v_head_dim=9, n_routed_experts=4, n_activated_experts=2,
                  moe_intermediate_size=20)
    kwargs.update(overrides)
    return HELMForCausalLM(HELMConfig(**kwargs))


# ---------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.37, 1.0])
def test_schedule_warms_up_linearly_then_decays_to_min_ratio(min_ratio):
    total, warmup = 200, 20
    f = [lr_multiplier(s, total, warmup, min_ratio) for s in range(total + 5)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f[warmup - 1] == pytest.approx(1.0) and f[warmup] == pytest.approx(1.0)  # continuous at the peak
    decay = f[warmup:total]
    assert all(a >= b - 1e-12 for a, b in zip(decay, decay[1:]))  # non-increasing
    assert f[total - 1] == pytest.approx(min_ratio) and f[-1] == pytest.approx(min_ratio)
    mid = warmup + (total - 1 - warmup) / 2
    assert lr_multiplier(int(mid), total, warmup, min_ratio) == pytest.approx(
        min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * int(mid - warmup) / (total - 1 - warmup))))
    assert min(f[warmup:]) >= min_ratio - 1e-12 and min(f[:warmup]) > 0  # no step at lr 0


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_multiplier(0, 10, 1, 1.5)
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier(0, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# Roles and optimizer split
# ---------------------------------------------------------------------------------------------------------------
def test_roles_never_decay_norms_biases_scales_curvatures_embeddings():
    for model in (tiny(), tiny(project_emb=True), tiny(geometry="euclidean", hidden_size=32, qk_nope_head_dim=8,
                                                        qk_rope_head_dim=8, v_head_dim=8)):
        roles = parameter_roles(model)
        assert set(roles) == {n for n, p in model.named_parameters() if p.requires_grad}
        for name, role in roles.items():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or leaf in ("bias", "b1", "b2", "b3", "temperature", "log_scale", "log_curvature") \
                    or name.endswith("residual.weight") or name.startswith("model.embed."):
                assert role in ("no_decay", "manifold", "embedding"), name
        decayed = {n for n, r in roles.items() if r == "decay"}
        assert "lm_head.weight" in decayed
        assert any(n.endswith("experts.w1") for n in decayed)
        manifold = {n for n, r in roles.items() if r == "manifold"}
        lorentz_table = model.config.geometry == "lorentz" and not model.config.project_emb
        assert manifold == ({"model.embed.weight"} if lorentz_table else set())
        embedding = {n for n, r in roles.items() if r == "embedding"}
        assert embedding == (set() if lorentz_table else {"model.embed.weight"})


def test_optimizer_split_and_weight_decay_groups():
    model = tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    adamw, radam = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(radam, geoopt.optim.RiemannianAdam)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    roles, params = parameter_roles(model), dict(model.named_parameters())
    by_group = {g["role"]: (ids(g), g["weight_decay"]) for g in opt.param_groups}
    assert by_group["manifold"] == ({id(model.model.embed.weight)}, 0.0)
    assert by_group["decay"][1] == 0.1 and by_group["no_decay"][1] == 0.0
    for name, role in roles.items():
        assert id(params[name]) in by_group[role][0], name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(roles)


def test_adamw_runs_fused_on_one_device_and_steps_like_the_default():
    """The trainer's AdamW takes the fused kernel for plain CPU parameters; its steps match the default
    (single-tensor) AdamW to rounding, weight-decay groups included. Mixed devices or non-float tensors keep the
    default."""
    from helmlm.training.optim import can_fuse_adamw

    models = [tiny(), tiny()]
    fused = build_optimizer(models[0], lr=1e-2, weight_decay=0.3)
    assert all(group["fused"] for group in fused.optimizers[0].param_groups)
    plain = build_optimizer(models[1], lr=1e-2, weight_decay=0.3)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in plain.optimizers[0].param_groups]
    plain.optimizers[0] = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    assert not any(group["fused"] for group in plain.optimizers[0].param_groups)
    # The same gradients for both (the models' own would feed rounding differences back, which Adam's 1/sqrt(v)
    # magnifies on near-zero coordinates): three steps, the moments and weight decay included.
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (name, a), (_, b), (_, before) in zip(models[0].named_parameters(), models[1].named_parameters(),
                                               tiny().named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(a, before), name  # every parameter moved
    assert not can_fuse_adamw([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not can_fuse_adamw([torch.zeros(2), torch.zeros(2, dtype=torch.int64)])
    assert can_fuse_adamw([torch.zeros(2), torch.zeros(3, dtype=torch.float64)])


def test_riemannian_step_keeps_embeddings_on_the_manifold_and_adamw_trains_the_rest():
    """100 steps at lr 1e-2: the Lorentz table moves, stays on the hyperboloid (geoopt re-projects), the loss
    falls; expert curvatures change but feel no weight decay (with lr * wd large, decay would shrink them)."""
    model = tiny().train()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.5)
    table0 = model.model.embed.weight.detach().clone()
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(100):
        opt.set_lr(lr_multiplier(step, 100, 10, 0.1))
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    table = model.model.embed.weight.detach()
    assert (table - table0).abs().max().item() > 1e-2
    assert manifold_violation(table, 1.0).max().item() < 1e-4
    assert losses[-1] < 0.5 * losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_allocated_state_trains_bit_for_bit_like_lazy_state(amsgrad):
    """``allocate_state`` before the first step (what the trainer does on CPU): the parameters and gradients are
    untouched, every parameter has state, and three steps of AdamW (weight decay, lr schedule) and Riemannian
    Adam (the Lorentz table, re-projected each step) give the same parameters and state, bit for bit, as the
    lazily created state; a second call creates nothing."""
    from helmlm.training.optim import allocate_state

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    runs = []
    for eager in (False, True):
        model = tiny().train()
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.3)
        assert isinstance(opt.optimizers[1], geoopt.optim.RiemannianAdam)
        for inner in opt.optimizers:
            for group in inner.param_groups:
                group["amsgrad"] = amsgrad
        if eager:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            assert allocate_state(opt) == len(before)
            assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
            assert allocate_state(opt) == 0
            # a parameter without state among ones with state and gradients: only it is touched
            first = next(iter(opt.optimizers[0].state))
            saved = {k: v.clone() for k, v in opt.optimizers[0].state[first].items()}
            del opt.optimizers[0].state[first]
            others = [p for p in model.parameters() if p is not first]
            for p in others:
                p.grad = torch.ones_like(p)
            def other_states():
                return [v.clone() for inner in opt.optimizers for p, st in inner.state.items() if p is not first
                        for v in st.values() if torch.is_tensor(v)]

            snapshot = other_states()
            assert allocate_state(opt) == 1 and all(p.grad is not None and p.grad.eq(1).all() for p in others)
            assert len(snapshot) > 10 and all(torch.equal(a, b) for a, b in zip(snapshot, other_states()))
            assert all(torch.equal(v, saved[k]) for k, v in opt.optimizers[0].state[first].items())
            opt.zero_grad()
            assert all(inner.state[p] for inner in opt.optimizers for g in inner.param_groups for p in g["params"])
        for step in range(3):
            opt.set_lr(lr_multiplier(step, 3, 1, 0.1))
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append((model.state_dict(), opt.state_dict()))
    (weights_lazy, state_lazy), (weights_eager, state_eager) = runs
    assert all(torch.equal(weights_lazy[k], weights_eager[k]) for k in weights_lazy)
    for lazy, eager in zip(state_lazy["optimizers"], state_eager["optimizers"]):
        assert lazy["state"].keys() == eager["state"].keys()
        for i in lazy["state"]:
            for key, value in lazy["state"][i].items():
                other = eager["state"][i][key]
                assert type(value) is type(other) and (torch.equal(value, other) if torch.is_tensor(value)
                                                       else value == other), (i, key)


def test_state_dict_round_trip_and_mismatch_error():
    model = tiny()
    opt = build_optimizer(model, lr=1e-3)
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    again = build_optimizer(model, lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["optimizers"][0]["state"].keys() == opt.state_dict()["optimizers"][0]["state"].keys()
    with pytest.raises(ValueError, match="another model"):
        build_optimizer(tiny(project_emb=True), lr=1e-3).load_state_dict(opt.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Embedding learning rates
# ---------------------------------------------------------------------------------------------------------------
def euclid_tiny(**overrides) -> HELMForCausalLM:
    return tiny(geometry="euclidean", hidden_size=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                **overrides)


def first_step_row_moves(model: HELMForCausalLM, **optimizer_kwargs) -> torch.Tensor:
    """How far each token row that the batch touches moves in one optimizer step from a fresh state (geodesic
    distance for the Lorentz table, via geoopt's own ``dist``; Euclidean norm otherwise)."""
    table = model.model.embed.weight
    old = table.detach().clone()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, eps=1e-30, **optimizer_kwargs)  # eps: no damping
    ids = torch.arange(0, 40).view(2, 20)
    model(ids, labels=ids).loss.backward()
    opt.step()
    rows = ids.unique()
    new = table.detach()[rows]
    if isinstance(table, geoopt.ManifoldParameter):
        return table.manifold.dist(old[rows], new)
    return (new - old[rows]).norm(dim=-1)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # fp32 distances of 1e-2 near acosh(1) carry percent-level errors
    yield
    torch.set_default_dtype(previous)


def test_one_step_moves_a_table_row_by_embedding_lr_times_sqrt_width_in_both_geometries(float64):
    """Adam's first step moves every coordinate by lr (m / sqrt(v) = sign(g)); so an AdamW row of D coordinates moves
    lr sqrt(D). Riemannian Adam normalises the whole row at once and moves it lr along the geodesic; the default
    ``sqrt_dim`` scaling gives it lr sqrt(n), n = the tangent dimension; ``none`` (the reference's) leaves lr."""
    lorentz, euclid = tiny(), euclid_tiny()
    n = lorentz.model.embed.weight.shape[-1] - 1
    d = euclid.model.embed.weight.shape[-1]
    moved = first_step_row_moves(lorentz, embedding_lr=2e-3)
    torch.testing.assert_close(moved, torch.full_like(moved, 2e-3 * math.sqrt(n)), rtol=1e-3, atol=0)
    moved = first_step_row_moves(tiny(), embedding_lr=2e-3, riemannian_lr_scaling="none")
    torch.testing.assert_close(moved, torch.full_like(moved, 2e-3), rtol=1e-3, atol=0)
    moved = first_step_row_moves(euclid, embedding_lr=2e-3)
    torch.testing.assert_close(moved, torch.full_like(moved, 2e-3 * math.sqrt(d)), rtol=1e-3, atol=0)
    moved = first_step_row_moves(tiny(), embedding_lr=2e-3, riemannian_lr=5e-4)  # an explicit lr wins
    torch.testing.assert_close(moved, torch.full_like(moved, 5e-4), rtol=1e-3, atol=0)


def test_embedding_lr_gets_its_own_group_only_when_it_differs():
    for model in (euclid_tiny(), tiny(project_emb=True)):
        table = model.model.embed.weight
        same = build_optimizer(model, lr=1e-3, embedding_lr=1e-3)
        assert [g["role"] for g in same.param_groups] == ["decay", "no_decay"]
        own = build_optimizer(model, lr=1e-3, embedding_lr=3e-2)
        [group] = [g for g in own.param_groups if g["role"] == "embedding"]
        assert group["params"] == [table] and group["lr"] == 3e-2 and group["weight_decay"] == 0.0
        own.set_lr(0.5)
        assert group["lr"] == pytest.approx(1.5e-2) and own.param_groups[0]["lr"] == pytest.approx(5e-4)
    radam = build_optimizer(tiny(), lr=1e-3, embedding_lr=1e-2).optimizers[1]
    assert radam.param_groups[0]["lr"] == pytest.approx(1e-2 * math.sqrt(33))


def test_riemannian_lr_rejects_an_unknown_scaling():
    assert riemannian_lr(torch.zeros(5, 17), 1e-3) == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="riemannian_lr_scaling must be one of sqrt_dim, none"):
        riemannian_lr(torch.zeros(5, 17), 1e-3, "sqrt")
