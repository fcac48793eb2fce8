"""helmlm.analysis: delta-hyperbolicity against brute force and known values, the power-law fit on synthetic data,
frequency bins that hold every token, Lorentz norms as geodesic distances, and the null point sets."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helmlm.analysis import (
    delta_hyperbolicity,
    embedding_norms,
    frequency_vs_norm,
    gaussian_like,
    pairwise_distances,
    random_rows,
)
from helmlm.analysis.hyperbolicity import delta_of_base_point
from helmlm.geometry import expmap0

F64 = torch.float64


def brute_force_delta(dist: torch.Tensor) -> float:
    """max over all quadruples of (largest - second largest of the three pair sums) / 2."""
    d = dist.tolist()
    best = 0.0
    for x, y, z, w in itertools.combinations(range(len(d)), 4):
        sums = sorted((d[x][y] + d[z][w], d[x][z] + d[y][w], d[x][w] + d[y][z]), reverse=True)
        best = max(best, (sums[0] - sums[1]) / 2)
    return best


def graph_distances(edges: list[tuple[int, int, float]], n: int) -> torch.Tensor:
    """All-pairs shortest paths (Floyd-Warshall), fp64."""
    d = torch.full((n, n), math.inf, dtype=F64)
    d.fill_diagonal_(0)
    for a, b, w in edges:
        d[a, b] = d[b, a] = w
    for k in range(n):
        d = torch.minimum(d, d[:, k:k + 1] + d[k:k + 1, :])
    return d


@pytest.mark.parametrize("seed", range(5))
def test_exact_delta_equals_brute_force_on_random_points(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(11, 3 + seed, dtype=F64, generator=g) * (1 + seed)
    dist = pairwise_distances(x)
    result = delta_hyperbolicity(dist, exact=True, block=4)
    assert result.exact and result.base_points == 11
    assert result.delta == pytest.approx(brute_force_delta(dist), abs=1e-12, rel=1e-12)
    assert result.relative_delta == pytest.approx(2 * result.delta / float(dist.max()))


@pytest.mark.parametrize("seed", range(3))
def test_tree_metrics_have_delta_zero(seed):
    """A random weighted tree (each node hangs off an earlier one): delta is 0, up to rounding."""
    g = torch.Generator().manual_seed(seed)
    n = 40
    edges = [(i, int(torch.randint(0, i, (1,), generator=g)), float(torch.rand(1, generator=g)) + 0.1)
             for i in range(1, n)]
    assert delta_hyperbolicity(graph_distances(edges, n), exact=True).delta == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("n", [4, 8, 12, 20])
def test_cycle_graphs_have_delta_n_over_4(n):
    """On the cycle C_n with unit edges (n divisible by 4), four equally spaced points give the largest
    four-point delta, n / 4; relative delta 2 (n/4) / (n/2) = 1."""
    dist = graph_distances([(i, (i + 1) % n, 1.0) for i in range(n)], n)
    result = delta_hyperbolicity(dist, exact=True)
    assert result.delta == n / 4 and result.relative_delta == 1.0
    if n <= 12:
        assert brute_force_delta(dist) == n / 4


def test_sampled_delta_is_a_lower_bound_that_reaches_the_exact_value():
    x = torch.randn(30, 5, dtype=F64, generator=torch.Generator().manual_seed(7))
    dist = pairwise_distances(x)
    exact = delta_hyperbolicity(dist, exact=True).delta
    estimates = [delta_hyperbolicity(dist, exact=False, base_points=m, seed=1).delta for m in (1, 4, 16, 30)]
    assert all(e <= exact + 1e-12 for e in estimates)
    assert estimates == sorted(estimates)  # more base points (a superset, same seed) never lower the bound
    assert estimates[-1] == pytest.approx(exact, abs=1e-12)
    assert estimates[0] >= exact / 2 - 1e-12  # one base point: delta_p <= delta <= 2 delta_p
    assert delta_of_base_point(dist, 0).item() <= exact + 1e-12


def test_delta_input_checks():
    with pytest.raises(ValueError, match="square"):
        delta_hyperbolicity(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="at least 4 points"):
        delta_hyperbolicity(torch.zeros(3, 3, dtype=F64))


def test_gaussian_null_matches_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, dtype=F64, generator=g) @ torch.tensor([[2.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 3, 0],
                                                                     [0, 0, 0, 0.5]], dtype=F64) + 5
    null = gaussian_like(x, n=20000, seed=1)
    torch.testing.assert_close(null.mean(0), x.mean(0), atol=0.08, rtol=0)
    cov = lambda t: ((t - t.mean(0)).T @ (t - t.mean(0))) / t.shape[0]  # noqa: E731
    torch.testing.assert_close(cov(null), cov(x), atol=0.15, rtol=0.05)
    rows = random_rows(x, 10, seed=2, exclude=torch.arange(490))
    assert rows.shape == (10, 4) and all(any(torch.equal(r, x[i]) for i in range(490, 500)) for r in rows)


def test_power_law_fit_recovers_the_exponent():
    pytest.importorskip("powerlaw")
    from helmlm.analysis import fit_power_law

    rng = np.random.default_rng(0)
    for alpha in (2.0, 2.5):
        # discrete power law for x >= 1 by inverse transform (Clauset, Shalizi and Newman 2009, eq. D.6)
        u = rng.random(50_000)
        samples = np.floor((1 - 0.5) * (1 - u) ** (-1 / (alpha - 1)) + 0.5).astype(np.int64)
        fit = fit_power_law(samples)
        assert abs(fit["alpha"] - alpha) < 0.05, fit
        assert fit["vs_exponential"]["R"] > 0  # a power law, not an exponential
    with pytest.raises(ValueError, match="at least 10 positive counts"):
        fit_power_law([0, 3, 5])


def test_every_token_falls_in_a_frequency_bin():
    rng = np.random.default_rng(1)
    counts = rng.zipf(1.8, size=3000)
    counts[rng.random(3000) < 0.2] = 0  # unseen tokens get their own bin
    norms = 1 / np.log(counts + 2) + rng.normal(0, 0.01, 3000)  # frequent tokens nearer the origin
    result = frequency_vs_norm(counts, norms, bins=10)
    assert sum(b["tokens"] for b in result["bins"]) == 3000 == result["tokens"]
    assert result["bins"][0]["bin"] == 0 and result["bins"][0]["count_max"] == 0
    assert result["bins"][-1]["count_max"] == counts.max()  # the most frequent token is in (the top bin)
    assert result["spearman_rho"] < -0.8
    with pytest.raises(ValueError, match="vocabulary of the tokenizer and the embedding table differ"):
        frequency_vs_norm(counts, norms[:10])


def test_lorentz_norm_is_the_geodesic_distance_to_the_origin():
    c = 2.0
    radii = torch.tensor([0.0, 0.3, 1.0, 4.0], dtype=F64)
    directions = torch.nn.functional.normalize(torch.randn(4, 7, dtype=F64), dim=-1)
    points = expmap0(radii[:, None] * directions, c)
    torch.testing.assert_close(embedding_norms(points, lorentz_curvature=c), radii, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(embedding_norms(points[:, 1:]), points[:, 1:].norm(dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# helmlm analyze
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    from helmlm.eval.harness import TASKS_DIR

    lines = [line for f in sorted((TASKS_DIR / "data").glob("*.jsonl")) for line in f.read_text().splitlines()]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(lines * 3))
    return path


def model_dir(tmp_path, corpus_file, geometry: str, vocab_size: int | None = None):
    from helmlm.data.tokenizer import train_bpe
    from helmlm.models import HELMConfig, HELMForCausalLM

    tokenizer = train_bpe(corpus_file.read_text().split("\n\n"), vocab_size=300)
    torch.manual_seed(0)
    width = 34 if geometry == "lorentz" else 32
    model = HELMForCausalLM(HELMConfig(geometry=geometry, vocab_size=vocab_size or len(tokenizer), hidden_size=width,
                                       num_hidden_layers=1, num_attention_heads=2))
    path = tmp_path / f"model-{geometry}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_analyze_writes_a_report_with_nulls(tmp_path, corpus_file, geometry, capsys):
    pytest.importorskip("powerlaw")
    from helmlm.cli import main

    path, model = model_dir(tmp_path, corpus_file, geometry)
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--corpus", str(corpus_file), "--points", "40", "--null-draws", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sum(b["tokens"] for b in report["frequency_vs_norm"]["bins"]) == report["vocab_size"] == 300
    d = report["delta"]
    assert d["points"] == 40 and d["tokens"]["exact"] and len(d["gaussian_null"]["draws"]) == 2
    assert d["distance"] == ("lorentz geodesic" if geometry == "lorentz" else "euclidean")
    assert 0 <= d["tokens"]["relative_delta"] <= 1
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "frequency.png", "frequency_norm.png",
                                               "delta.png"}
    if "unavailable" not in report["ricci"]:
        assert report["ricci"]["tokens"]["edges"] >= 40 * 10 // 2 and (out / "ricci.png").is_file()
        assert len(report["ricci"]["gaussian_null"]) == 2
    if geometry == "lorentz":  # geodesic radii: the table starts at radius 1 around the origin
        assert all(b["norm_mean"] == pytest.approx(1.0, abs=1e-3) for b in report["frequency_vs_norm"]["bins"])
    captured = capsys.readouterr()
    assert "| the tokens |" in captured.out
    assert "delta: tokens and nulls" in captured.err and "counting tokens" in captured.err  # progress bars
    assert main(["analyze", str(path), "--corpus", str(corpus_file), "--out", str(out)]) == 2  # no overwrite
    assert "already holds a report" in capsys.readouterr().err


def test_analyze_bad_input_exits_2(tmp_path, corpus_file, capsys):
    from helmlm.cli import main

    path, _ = model_dir(tmp_path, corpus_file, "euclidean", vocab_size=100)  # a table smaller than the tokenizer
    assert main(["analyze", str(path), "--corpus", str(corpus_file), "--out", str(tmp_path / "a")]) == 2
    assert "outside the model's vocabulary of 100" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["analyze", str(path), "--corpus", str(empty), "--out", str(tmp_path / "b")]) == 2
    assert "error: the corpus gave no tokens" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ollivier_ricci_signs_on_known_graphs():
    """Dense cliques are positively curved, the edges of a tree's branching nodes negatively."""
    pytest.importorskip("ot")
    import networkx as nx

    from helmlm.analysis.ricci import knn_graph, ollivier_ricci

    assert (ollivier_ricci(nx.complete_graph(8)) > 0).all()
    tree = nx.balanced_tree(3, 3)
    nx.set_edge_attributes(tree, 1.0, "weight")
    internal = [i for i, (u, v) in enumerate(tree.edges()) if tree.degree(u) > 1 and tree.degree(v) > 1]
    assert (ollivier_ricci(tree)[internal] < 0).all()
    points = torch.randn(30, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    graph = knn_graph(pairwise_distances(points), k=4)
    assert all(graph.degree(i) >= 4 for i in graph) and graph.number_of_nodes() == 30
    with pytest.raises(ValueError, match="k must be in"):
        knn_graph(pairwise_distances(points), k=30)


RICCI_FIXTURE = Path(__file__).parent / "fixtures" / "ricci_graphricci_0.6.1.json"


def _ricci_fixture_graph(entry: dict):
    """A fixture graph as stored: its nodes in order, its edges in ``graph.edges()`` order, weighted where given."""
    import networkx as nx

    graph = nx.Graph()
    graph.add_nodes_from(entry["nodes"])
    for u, v, w in entry["edges"]:
        graph.add_edge(u, v, **({} if w is None else {"weight": w}))
    return graph


def test_ollivier_ricci_matches_graphriccicurvature():
    """The curvatures equal GraphRicciCurvature 0.6.1's (OllivierRicci(..., method="OTD"), stored in the fixture) to
    1e-9 on cliques, a tree, cycles, kNN graphs and a weighted graph with shortcuts, at alpha 0, 0.5 and 0.9."""
    pytest.importorskip("ot")
    import networkx as nx

    from helmlm.analysis.ricci import EPSILON, ollivier_ricci

    fixture = json.loads(RICCI_FIXTURE.read_text())
    assert fixture["versions"]["GraphRicciCurvature"] == "0.6.1"
    for name, entry in fixture["graphs"].items():
        graph = _ricci_fixture_graph(entry)
        assert [list(edge) for edge in graph.edges()] == [edge[:2] for edge in entry["edges"]], name
        for alpha, expected in entry["curvature"].items():
            np.testing.assert_allclose(ollivier_ricci(graph, alpha=float(alpha)), expected, rtol=0, atol=1e-9,
                                       err_msg=f"{name}, alpha={alpha}")
    # the fixture reaches the rules that are easy to get wrong: denominators shorter than the edge (a path around
    # it), endpoints closer than EPSILON (curvature 0), nodes whose neighbour terms sum below EPSILON (even spread)
    shortcuts = _ricci_fixture_graph(fixture["graphs"]["weighted_shortcuts"])
    d = dict(nx.all_pairs_dijkstra_path_length(shortcuts))
    assert sum(d[u][v] < w - 1e-9 for u, v, w in shortcuts.edges(data="weight")) >= 10
    assert sum(d[u][v] < EPSILON for u, v in shortcuts.edges()) >= 2
    far = _ricci_fixture_graph(fixture["graphs"]["knn_60_k5_far"])
    assert any(sum(math.exp(-w ** 2) for *_, w in far.edges(x, data="weight")) <= EPSILON for x in far)
    # self-loops are left out (no value), as GraphRicciCurvature drops them
    looped = _ricci_fixture_graph(fixture["graphs"]["cycle_5"])
    looped.add_edge(2, 2)
    np.testing.assert_allclose(ollivier_ricci(looped), fixture["graphs"]["cycle_5"]["curvature"]["0.5"], atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# routed models: expert curvatures and loads; training runs and checkpoints
# ---------------------------------------------------------------------------------------------------------------
def tiny_mice(vocab_size: int = 97, geometry: str = "lorentz"):
    from helmlm.models import HELMConfig, HELMForCausalLM

    torch.manual_seed(0)
    width, head = (34, 9) if geometry == "lorentz" else (32, 8)
    return HELMForCausalLM(HELMConfig(
        geometry=geometry, vocab_size=vocab_size, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=68, attention="mla", ffn="moe", kv_lora_rank=8, qk_nope_head_dim=head,
        qk_rope_head_dim=head, v_head_dim=head, moe_intermediate_size=24, n_routed_experts=4, n_activated_experts=2, n_dense_layers=0,
        max_position_embeddings=64, expert_curvatures=[0.5, 1.0, 1.5, 2.0] if geometry == "lorentz" else None))


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_expert_loads_equal_the_layers_own_training_counts(geometry):
    """The hooked evaluation-mode count equals what the routed layers' own buffers count in training mode on the
    same tokens (an independent path), sums to 1, leaves the buffers and the mode untouched; MiCE reports its
    experts' curvatures."""
    from helmlm.analysis.experts import expert_loads
    from helmlm.nn.routing import routed_layers, routing_stats

    model = tiny_mice(geometry=geometry).eval()
    ids = torch.randint(0, 97, (3 * 32 + 5,), generator=torch.Generator().manual_seed(1))
    loads = expert_loads(model, ids, seq_len=32, batch_size=2)
    assert not model.training and loads["tokens"] == ids.numel()
    assert all(int(layer.tokens_per_expert.sum()) == 0 for _, layer in routed_layers(model))
    model.train()
    with torch.no_grad():
        for row in (ids[:64].view(2, 32), ids[64:96].view(1, 32), ids[96:].view(1, 5)):
            model(row)
    expected = routing_stats(model)
    assert loads["layers"].keys() == expected.keys() and len(expected) == 2
    for name, entry in loads["layers"].items():
        assert entry["load"] == pytest.approx(expected[name]["load"], abs=1e-12)
        assert sum(entry["load"]) == pytest.approx(1.0) and 0 < entry["load_entropy"] <= 1
        assert ("curvatures" in entry) == (geometry == "lorentz")
    if geometry == "lorentz":
        assert loads["layers"]["model.layers.0.ffn"]["curvatures"] == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_analyze_reports_the_experts_of_a_mice_model(tmp_path, corpus_file):
    pytest.importorskip("powerlaw")
    from helmlm.cli import main
    from helmlm.data.tokenizer import train_bpe

    tokenizer = train_bpe(corpus_file.read_text().split("\n\n"), vocab_size=300)
    path = tmp_path / "mice"
    tiny_mice(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--corpus", str(corpus_file), "--points", "20", "--null-draws", "1",
                 "--expert-tokens", "500", "--out", str(out)]) == 0
    experts = json.loads((out / "report.json").read_text())["experts"]
    assert experts["tokens"] == 500 and len(experts["layers"]) == 2
    assert "## Experts" in (out / "report.md").read_text() and (out / "experts.png").is_file()


def test_analyze_reads_a_training_run_like_its_export(tmp_path):
    """``helmlm analyze RUN_DIR`` loads the run's newest checkpoint and its tokenizer in memory: the report equals
    the one of the exported model directory; a wrong --tokenizer use is refused."""
    pytest.importorskip("powerlaw")
    from test_train import overrides

    from helmlm.cli import main
    from helmlm.config import load_train_config
    from helmlm.training.export import export_checkpoint
    from helmlm.training.trainer import train

    rng = np.random.default_rng(0)
    words = "the of and to in a is that it was for on are as with his they at be this from have".split()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n" for _ in range(60)))
    train(load_train_config(None, overrides(corpus, tmp_path / "run", "train.steps=2", "eval.every=2",
                                            "checkpoint.every=2")))
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    reports = []
    for source in ("run", "hf"):
        out = tmp_path / f"report-{source}"
        assert main(["analyze", str(tmp_path / source), "--corpus", str(corpus), "--points", "20", "--null-draws",
                     "1", "--out", str(out)]) == 0
        reports.append({k: v for k, v in json.loads((out / "report.json").read_text()).items() if k != "model"})
    assert reports[0] == reports[1] and reports[0]["geometry"].startswith("lorentz")
    assert main(["analyze", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "hf"), "--corpus", str(corpus),
                 "--out", str(tmp_path / "x")]) == 2


def test_a_model_without_input_embeddings_is_refused():
    from helmlm.cli import _embedding_table
    from helmlm.errors import InputError

    class NoTable(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError

    class NoneTable(torch.nn.Module):
        def get_input_embeddings(self):
            return None

    for model in (NoTable(), NoneTable()):
        with pytest.raises(InputError, match="has no input-embedding table"):
            _embedding_table(model)


def test_more_points_than_the_exact_delta_allows_switch_to_sampling_and_say_so(monkeypatch, corpus_file):
    pytest.importorskip("powerlaw")
    from helmlm.analysis import report as report_module
    from helmlm.data.tokenizer import train_bpe

    monkeypatch.setattr(report_module, "EXACT_MAX_POINTS", 12)
    tokenizer = train_bpe(corpus_file.read_text().split("\n\n"), vocab_size=300)
    table = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    said = []
    report = report_module.analyze_embeddings(table, tokenizer, corpus_file.read_text().split("\n\n"), points=20,
                                              null_draws=1, progress=False, log=said.append)
    assert any("more than the 12 of the exact delta" in line and "lower bound" in line for line in said)
    d = report["delta"]
    assert not d["tokens"]["exact"] and d["tokens"]["base_points"] == 16 and d["points"] == 20
    assert "lower bound from 16 base points" in report_module.markdown(report, "t")


def test_default_report_names_keep_runs_apart(tmp_path):
    from helmlm.cli import _report_name

    run = tmp_path / "helm_mice_tiny" / "lr=0.003,seed=1"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010" / "state.json").write_text("{}")
    model = tmp_path / "smollm2"
    model.mkdir()
    assert _report_name(run) == "helm_mice_tiny-lr=0.003,seed=1"
    assert _report_name(run / "checkpoints" / "step-00000010") == "lr=0.003,seed=1-step-00000010"
    assert _report_name(model) == "smollm2"


# ---------------------------------------------------------------------------------------------------------------
# the Poincaré disk (issue 30)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_lorentz_points_land_at_the_poincare_radius_of_their_geodesic_radius(c):
    from helmlm.analysis.disk import lorentz_to_poincare, poincare_disk

    radii = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 12.0], dtype=F64)
    angles = torch.rand(len(radii), dtype=F64, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    points = expmap0(radii[:, None] * directions, c)  # 2-D hyperbolic plane, points at known geodesic radii
    expected = c ** 0.5 * torch.tanh(radii / (2 * c ** 0.5))  # tanh(r / 2) for c = 1
    torch.testing.assert_close(lorentz_to_poincare(points, c).norm(dim=-1), expected, atol=1e-12, rtol=1e-12)
    xy, radius, info = poincare_disk(points, c)
    torch.testing.assert_close(xy.norm(dim=-1), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(radius, radii, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(xy[1:] / xy[1:].norm(dim=-1, keepdim=True), directions[1:], atol=1e-12, rtol=0)
    assert info["disk_radius"] == c ** 0.5 and "radius exact" in info["map"] and "angle exact" in info["map"]


def test_euclidean_vectors_map_by_expmap0_after_dividing_by_their_median_norm():
    from helmlm.analysis.disk import poincare_disk

    v = torch.randn(9, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * 5
    scale = float(v.norm(dim=-1).median())
    xy, radius, info = poincare_disk(v, None)
    expected = torch.tanh(v.norm(dim=-1, keepdim=True) / (2 * scale)) * v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(xy, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(radius, v.norm(dim=-1) / scale)
    assert info["euclidean_scale"] == pytest.approx(scale) and info["curvature"] == 1.0
    assert "expmap0" in info["map"] and "median norm" in info["map"]
    # rows after `fit` (the labelled words) are mapped with the fitted scale, not their own
    xy_fit, _, info_fit = poincare_disk(torch.cat([v, 100 * v[:1]]), None, fit=len(v))
    assert info_fit["euclidean_scale"] == pytest.approx(scale)
    torch.testing.assert_close(xy_fit[:len(v)], xy)


def test_higher_dimensions_keep_radii_and_project_only_the_directions():
    from helmlm.analysis.disk import poincare_disk

    gen = torch.Generator().manual_seed(2)
    plane = torch.linalg.qr(torch.randn(6, 2, dtype=F64, generator=gen))[0]  # a random plane in 6-D
    flat = torch.randn(30, 2, dtype=F64, generator=gen)
    points = expmap0(flat @ plane.T, 1.0)
    xy, radius, info = poincare_disk(points, 1.0)
    torch.testing.assert_close(radius, flat.norm(dim=-1))
    torch.testing.assert_close(xy.norm(dim=-1), torch.tanh(flat.norm(dim=-1) / 2), atol=1e-12, rtol=1e-12)
    unit, unit_xy = flat / flat.norm(dim=-1, keepdim=True), xy / xy.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(unit_xy @ unit_xy.T, unit @ unit.T, atol=1e-10, rtol=0)  # directions in a plane: exact
    assert info["direction_share"] == pytest.approx(1.0) and "projected" in info["map"]
    _, _, info = poincare_disk(expmap0(torch.randn(30, 6, dtype=F64, generator=gen), 1.0), 1.0)
    assert 2 / 6 <= info["direction_share"] < 1  # the top-2 plane keeps at least its share of isotropic directions


def test_rank_bins_are_log_spaced_and_hold_every_rank():
    from helmlm.analysis.disk import rank_bins

    assert rank_bins(300) == [(1, 10), (11, 30), (31, 100), (101, 300)]
    assert rank_bins(500) == [(1, 10), (11, 30), (31, 100), (101, 300), (301, 500)]
    assert rank_bins(7) == [(1, 7)]


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_analyze_draws_the_tokens_in_the_poincare_disk(tmp_path, corpus_file, geometry):
    pytest.importorskip("powerlaw")
    from helmlm.analysis.interactive import hover_text
    from helmlm.cli import main

    path, _ = model_dir(tmp_path, corpus_file, geometry)
    out = tmp_path / "report"
    assert main(["analyze", str(path), "--corpus", str(corpus_file), "--points", "40", "--null-draws", "1",
                 "--out", str(out)]) == 0
    disk = json.loads((out / "report.json").read_text())["disk"]
    assert disk["points"] == 40 and [b["ranks"] for b in disk["bins"]] == [[1, 10], [11, 30], [31, 40]]
    assert ("Lorentz table" if geometry == "lorentz" else "Euclidean table") in disk["map"]
    assert {w["group"] for w in disk["words"]} >= {"G1"}
    assert (out / "disk.png").stat().st_size > 10_000
    assert "## Poincaré disk" in (out / "report.md").read_text()
    try:
        import plotly  # noqa: F401
    except ImportError:
        assert disk["html"] is False and not (out / "disk.html").exists()
        assert "pip install 'helmlm[plots]'" in (out / "report.md").read_text()
        return
    from transformers import AutoTokenizer

    page = (out / "disk.html").read_text()
    tokenizer = AutoTokenizer.from_pretrained(path)
    top = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    shown = [t for t in top if t.strip().isalpha() and repr(t) in page]
    assert len(shown) >= 10  # the tokens' strings are in the hover text
    assert hover_text(" the", 1, 1234, 0.5).startswith("' the'<br>rank 1, count 1,234")
    assert hover_text("<b>", 2, 5, 0.5).startswith("'&lt;b&gt;'<br>")  # escaped: a token is text, not markup


def test_without_plotly_the_report_says_how_to_add_it(tmp_path, corpus_file, monkeypatch):
    pytest.importorskip("powerlaw")
    import sys

    from helmlm.analysis import report as report_module
    from helmlm.data.tokenizer import train_bpe

    tokenizer = train_bpe(corpus_file.read_text().split("\n\n"), vocab_size=300)
    table = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(report_module, "ricci_with_null", lambda *a, **k: ({"unavailable": "skipped"}, {}))
    report = report_module.analyze_embeddings(table, tokenizer, corpus_file.read_text().split("\n\n"), points=20,
                                              null_draws=1, progress=False, disk_points=30)
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    files = report_module.write_report(report, tmp_path / "r", title="t")
    assert tmp_path / "r" / "disk.png" in files and not (tmp_path / "r" / "disk.html").exists()
    assert report["disk"]["points"] == 30 and report["delta"]["points"] == 20
    assert "No `disk.html`: plotly is not installed; `pip install 'helmlm[plots]'` adds it" in (
        tmp_path / "r" / "report.md").read_text()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["disk"]["html"] is False
