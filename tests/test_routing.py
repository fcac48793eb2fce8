"""Routing shared by MiCE and the Euclidean MoE twin: grouped (sparse) dispatch equals the dense path, the forward
never synchronises with the host, group-limited routing, the balance loss (padding ignored), the loss-free bias
update (load spread shrinks; one all-reduce across ranks), routing statistics, the MLA twin's padding."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from helmlm.geometry import lift, manifold_violation
from helmlm.models import ConfigError, HELMConfig, HELMForCausalLM
from helmlm.nn import (
    Gate,
    LatentAttention,
    MiCE,
    MoE,
    balance_step,
    routing_stats,
    sequence_balance_loss,
    update_balance_bias,
)
from helmlm.nn.rotary import rotary_tables
from helmlm.nn.routing import routed_layers

CURVATURES = [0.3, 0.8, 1.2, 2.0]


def make_layer(kind: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    if kind == "moe":
        return MoE(32, 24, 4, 2, 1, **kwargs)
    return MiCE(34, 24, 4, 2, 1, CURVATURES, combine=kind, **kwargs)


def make_input(kind: str, batch: int = 2, length: int = 16, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "moe":
        return torch.randn(batch, length, 32, generator=g, dtype=dtype)
    return lift(3 * torch.randn(batch, length, 33, generator=g, dtype=dtype), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["paper", "reference", "moe"])
def test_grouped_dispatch_equals_dense(kind):
    """Grouped (sparse) and dense dispatch give the same outputs and gradients (fp32), also when the bias starves
    an expert of every token (an empty group)."""
    for starve in (False, True):
        layer = make_layer(kind)
        if starve:
            layer.gate.bias[1] = -10.0
        x = make_input(kind)
        results = []
        for dispatch in ("grouped", "dense"):
            layer.dispatch = dispatch
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
            results.append((y.detach(), xi.grad, grads))
        (yg, xg, gg), (yd, xd, gd) = results
        scale = yd.abs().max().item()
        assert (yg - yd).abs().max().item() <= 2e-5 * scale, kind
        assert (xg - xd).abs().max().item() <= 2e-5 * xd.abs().max().item()
        assert gg.keys() == gd.keys()
        for name in gd:
            assert (gg[name] - gd[name]).abs().max().item() <= 1e-4 * (gd[name].abs().max().item() + 1e-6), name
        if starve:
            assert layer.tokens_per_expert[1].item() == 0


def test_cpu_grouped_mm_custom_op_is_grouped_mm():
    """The custom op that lets torch.compile trace the fp32 CPU kernel: its fake, autograd and schema registrations
    pass ``opcheck``, and its value and gradients are ``F.grouped_mm``'s (an empty group included)."""
    from helmlm.nn.routing import cpu_grouped_mm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 8, 16, generator=g, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    torch.library.opcheck(cpu_grouped_mm, (x, w, offs))
    upstream = torch.randn(10, 16, generator=g)
    got = cpu_grouped_mm(x, w, offs)
    want = torch.nn.functional.grouped_mm(x, w, offs=offs)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, w), upstream), torch.autograd.grad(want, (x, w), upstream)):
        torch.testing.assert_close(a, b)


def test_grouped_dispatch_computes_only_routed_rows():
    """The grouped experts see exactly T * k rows (the routed pairs), not E * T."""
    layer = make_layer("paper")
    x = make_input("paper", batch=3, length=10)
    seen = []
    layer.experts.forward_rows = (lambda f: lambda xs, route: seen.append(route.expert.numel()) or f(xs, route))(
        layer.experts.forward_rows)
    layer.dispatch = "grouped"
    layer(x)
    assert seen == [3 * 10 * 2]


class _SyncDetector(TorchDispatchMode):
    """Records ops that copy a device value to the host (what .item()/.tolist()/nonzero do)."""

    HOST_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.HOST_OPS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["paper", "reference", "moe"])
@pytest.mark.parametrize("dispatch", ["grouped", "dense"])
def test_forward_and_backward_never_read_routing_on_host(kind, dispatch):
    """No op of the forward and backward passes copies a value to the host. (On CPU ``.tolist()`` bypasses the
    dispatcher, so the source of the forward path is also checked for it.)"""
    from helmlm.nn import mice, moe, routing

    for fn in (routing.RoutedFFN.route, routing.RoutedFFN.routed_outputs, routing.route_by_expert,
               routing.grouped_linear, routing.sequence_balance_loss, mice.MiCE.forward, moe.MoE.forward,
               mice.LorentzExperts.forward_rows, moe.Experts.forward_rows):
        assert ".tolist()" not in inspect.getsource(fn) and ".item()" not in inspect.getsource(fn), fn
    layer = make_layer(kind, dispatch=dispatch)
    x = make_input(kind).requires_grad_()
    with _SyncDetector() as detector:
        y = layer(x)
        (y.sum() + layer.aux_loss).backward()
    assert detector.syncs == []


@pytest.mark.parametrize("kind", ["paper", "moe"])
def test_auto_dispatch_runs_decoding_steps_densely(kind):
    """``auto``: a few tokens (a decoding step) run every expert densely, a batch uses the grouped kernel; both
    give the same output."""
    layer = make_layer(kind)
    small, large = make_input(kind, batch=1, length=1), make_input(kind, batch=2, length=16)
    assert layer.use_grouped(small) is None and layer.use_grouped(large) == torch.float32
    grouped = make_layer(kind, dispatch="grouped")
    torch.testing.assert_close(layer(small), grouped(small), rtol=2e-5, atol=2e-5)


def test_fp64_falls_back_to_dense_and_grouped_refuses_it_clearly():
    layer = make_layer("paper").double()
    x = make_input("paper", dtype=torch.float64)
    calls = []
    layer.experts.forward_rows = lambda *a: calls.append(1)
    layer(x)  # auto: dense for fp64
    assert calls == []
    layer.dispatch = "grouped"
    with pytest.raises(RuntimeError, match="grouped.*float64.*dispatch='auto'"):
        layer(x)


# ---------------------------------------------------------------------------------------------------------------
# Gate
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_routing_matches_brute_force(score_func):
    """With 8 experts in 4 groups and 2 allowed groups: per token, pick the 2 groups with the largest sum of their
    top-2 biased scores, then the top-3 biased experts inside them (a per-token Python loop)."""
    torch.manual_seed(0)
    gate = Gate(16, 8, 3, score_func, route_scale=1.5, n_expert_groups=4, n_limited_groups=2)
    gate.bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(40, 16)
    weights, indices, scores = gate(x)
    biased = scores + gate.bias
    for t in range(x.shape[0]):
        groups = biased[t].view(4, 2)
        group_score = groups.sort(descending=True).values[:, :2].sum(-1)
        allowed = set(group_score.argsort(descending=True)[:2].tolist())
        candidates = [e for e in range(8) if e // 2 in allowed]
        expected = sorted(candidates, key=lambda e: -biased[t, e].item())[:3]
        assert sorted(indices[t].tolist()) == sorted(expected)
        chosen = scores[t, indices[t]]
        assert torch.allclose(weights[t], 1.5 * chosen / chosen.sum())
    assert {e // 2 for e in indices.flatten().tolist()} == {0, 1, 2, 3}  # not all tokens use the same groups


# ---------------------------------------------------------------------------------------------------------------
# Balance loss
# ---------------------------------------------------------------------------------------------------------------
def brute_balance_loss(scores, indices, valid):
    """Per sequence over its real tokens: E/(k T) * counts . mean normalised score; mean over sequences."""
    n_experts, k = scores.shape[-1], indices.shape[-1]
    losses = []
    for b in range(scores.shape[0]):
        real = [t for t in range(scores.shape[1]) if valid[b, t]]
        if not real:
            continue
        counts = torch.zeros(n_experts, dtype=torch.float64)
        for t in real:
            for e in indices[b, t].tolist():
                counts[e] += 1
        f = counts * n_experts / (k * len(real))
        p = torch.stack([scores[b, t] / scores[b, t].sum() for t in real]).mean(0)
        losses.append((f * p).sum())
    return torch.stack(losses).mean()


def test_balance_loss_matches_per_sequence_definition_and_ignores_padding():
    torch.manual_seed(0)
    scores = torch.rand(3, 12, 6, dtype=torch.float64).softmax(-1)
    indices = scores.topk(2, dim=-1).indices
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[0, 9:] = False
    valid[2, :] = False  # a sequence of padding only is skipped
    loss = sequence_balance_loss(scores, indices, valid)
    assert loss.item() == pytest.approx(brute_balance_loss(scores, indices, valid).item(), rel=1e-12)
    # What padding tokens route to or score does not matter.
    scores2, indices2 = scores.clone(), indices.clone()
    scores2[~valid] = torch.rand(int((~valid).sum()), 6, dtype=torch.float64)
    indices2[~valid] = 0
    assert sequence_balance_loss(scores2, indices2, valid).item() == pytest.approx(loss.item(), rel=1e-12)
    # ... and equals the loss of the sequences cut to their real tokens.
    alone = sequence_balance_loss(scores[:1, :9], indices[:1, :9])
    second = sequence_balance_loss(scores[1:2], indices[1:2])
    assert loss.item() == pytest.approx((alone.item() + second.item()) / 2, rel=1e-12)


def test_balance_loss_is_one_when_balanced_and_larger_when_skewed():
    n, e, k = 8, 4, 2
    uniform = torch.full((1, n, e), 1.0 / e)
    cycling = torch.tensor([[[t % e, (t + 1) % e] for t in range(n)]])
    assert sequence_balance_loss(uniform, cycling).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.2, 0.05, 0.05]]).expand(1, n, e)
    always01 = torch.tensor([[0, 1]]).expand(1, n, k)
    assert sequence_balance_loss(skewed, always01).item() == pytest.approx(e / k * (0.7 + 0.2))


def test_layer_balance_loss_and_stats_ignore_padding():
    """A routed layer's aux_loss and statistics with padding (valid=False) equal those of the real tokens alone."""
    layer = make_layer("paper")
    x = make_input("paper", batch=1, length=20)
    valid = torch.zeros(1, 20, dtype=torch.bool)
    valid[0, :13] = True
    layer(x, valid)
    padded_loss, padded_counts = layer.aux_loss, layer.tokens_per_expert.clone()
    layer.reset_stats()
    layer(x[:, :13])
    assert padded_loss.item() == pytest.approx(layer.aux_loss.item(), rel=1e-6)
    assert torch.equal(padded_counts, layer.tokens_per_expert)
    assert padded_counts.sum().item() == 13 * 2


# ---------------------------------------------------------------------------------------------------------------
# Loss-free bias update
# ---------------------------------------------------------------------------------------------------------------
def test_update_balance_bias_formula():
    bias = torch.tensor([0.1, 0.0, -0.2, 0.0])
    counts = torch.tensor([50, 30, 20, 0])
    load = update_balance_bias(bias, counts, speed=0.1)
    u = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    assert torch.allclose(load, u)
    assert torch.allclose(bias, torch.tensor([0.1, 0.0, -0.2, 0.0]) + 0.1 * (0.25 - u.float()))
    before = bias.clone()
    update_balance_bias(bias, torch.zeros(4), speed=0.1)
    assert torch.equal(bias, before)


@pytest.mark.parametrize("kind", ["paper", "moe"])
def test_bias_updates_move_a_skewed_gate_toward_uniform_load(kind):
    """A gate skewed toward expert 0 (its weight row aligned with a direction shared by all inputs): over 60
    forward passes + balance_step calls (128 tokens each) the spread max - min of the per-expert load shrinks by
    more than half, while the gate's weights (the source of the routing weights) never change."""
    layer = make_layer(kind)
    dim = layer.gate.weight.shape[1]
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():
        layer.gate.weight[0] += 2.0 * direction
    weight_before = layer.gate.weight.clone()
    g = torch.Generator().manual_seed(4)
    spreads = []
    for _ in range(60):
        feats = 1.5 * direction + torch.randn(4, 32, dim, generator=g)
        x = lift(feats, 1.0) if kind != "moe" else feats
        with torch.no_grad():
            layer(x)
        load = balance_step(layer, speed=0.1)[0]
        spreads.append((load.max() - load.min()).item())
    print(f"{kind}: load spread {spreads[0]:.3f} -> {spreads[-1]:.3f}")
    first, last = sum(spreads[:3]) / 3, sum(spreads[-10:]) / 10  # averages: one batch's load is noisy
    assert first > 0.25
    assert last < 0.5 * first
    assert torch.equal(layer.gate.weight, weight_before)
    assert layer.tokens_per_expert.sum().item() == 0  # balance_step resets the statistics


def test_routing_stats_report_load_scores_and_bias():
    config = HELMConfig(vocab_size=50, hidden_size=34, num_hidden_layers=3, num_attention_heads=2, attention="mla",
                        ffn="moe", kv_lora_rank=8, qk_nope_head_dim=9, qk_rope_head_dim=9, v_head_dim=9,
                        n_dense_layers=1, n_routed_experts=4, n_activated_experts=2, moe_intermediate_size=20,
                        max_position_embeddings=32)
    torch.manual_seed(0)
    model = HELMForCausalLM(config)
    ids = torch.randint(0, 50, (2, 16))
    scores = {}
    for i in (1, 2):
        model.model.layers[i].ffn.gate.register_forward_hook(
            lambda m, inp, out, i=i: scores.__setitem__(i, out[2].detach()))
    with torch.no_grad():
        model(ids)
    stats = routing_stats(model)
    assert list(stats) == ["model.layers.1.ffn", "model.layers.2.ffn"]
    for i, name in ((1, "model.layers.1.ffn"), (2, "model.layers.2.ffn")):
        s = stats[name]
        assert sum(s["load"]) == pytest.approx(1.0)
        assert s["mean_score"] == pytest.approx(scores[i].flatten(0, 1).mean(0).tolist(), rel=1e-5)
        assert s["bias"] == [0.0] * 4
    # Evaluation does not feed the bias update: eval-mode forwards leave the statistics untouched.
    before = {name: layer.tokens_per_expert.clone() for name, layer in routed_layers(model)}
    model.eval()
    with torch.no_grad():
        model(ids)
    assert all(torch.equal(layer.tokens_per_expert, before[name]) for name, layer in routed_layers(model))
    assert all(before[name].sum() > 0 for name in before)


def _balance_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    layer = make_layer("moe")
    layer.tokens_per_expert.copy_(torch.tensor([[9, 1, 0, 2], [1, 3, 6, 0]][rank]))
    balance_step(layer, speed=0.1)
    results[rank] = layer.gate.bias.tolist()
    dist.destroy_process_group()


def test_balance_step_all_reduces_counts_across_ranks(tmp_path):
    """Two gloo ranks with different local counts end with identical biases: the update of the summed counts."""
    results = mp.Manager().dict()
    mp.spawn(_balance_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    expected = torch.zeros(4)
    update_balance_bias(expected, torch.tensor([10, 4, 6, 2]), speed=0.1)
    assert results[0] == results[1] == pytest.approx(expected.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Euclidean MLA twin and configs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v_dim", [6, 20])
def test_latent_attention_padding_is_exact(v_dim):
    """The twin's MLA (zero-padded to one head dim for SDPA) equals explicit softmax attention (fp64)."""
    torch.manual_seed(0)
    attn = LatentAttention(24, 3, 8, 6, 4, v_dim).double()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    cos, sin = rotary_tables(torch.arange(10).unsqueeze(0), 4, 10000.0, torch.float64)
    q = attn.query(x, cos, sin).transpose(1, 2)
    k, v = (t.transpose(1, 2) for t in attn.expand(*attn.compress(x, cos, sin)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(10)
    scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).flatten(-2))
    assert (attn(x, cos, sin) - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("overrides,match", [
    (dict(geometry="euclidean", hidden_size=32, qk_rope_head_dim=7), r"rotary dim 7 is odd.*even qk_rope_head_dim"),
    (dict(moe_dispatch="sparse"), r"moe_dispatch.*sparse"),
    (dict(moe_balance_alpha=-1.0), r"moe_balance_alpha.*-1"),
    (dict(moe_intermediate_size=1), r"moe_intermediate_size.*>= 2"),
    (dict(geometry="euclidean", hidden_size=32, kv_lora_rank=0), r"kv_lora_rank.*0"),
])
def test_inconsistent_moe_configs_name_the_field(overrides, match):
    base = dict(vocab_size=50, hidden_size=34, num_hidden_layers=2, num_attention_heads=2, attention="mla",
                ffn="moe", kv_lora_rank=8, qk_nope_head_dim=9, qk_rope_head_dim=9, v_head_dim=9,
                moe_intermediate_size=20)
    with pytest.raises(ConfigError, match=match):
        HELMConfig(**{**base, **overrides}).validate()


def test_mice_paper_mode_output_on_manifold_grouped():
    layer = make_layer("paper")
    y = layer(make_input("paper", batch=2, length=32))
    assert manifold_violation(y, 1.0, relative_to="scale").max().item() < 1e-5
