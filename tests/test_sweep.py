"""``helmlm sweep``: the grid and seed stages, resuming after an interruption (same results as an uninterrupted
sweep), the outputs, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from test_train import corpus, overrides  # noqa: F401  (corpus is a fixture)

from helmlm.cli import main
from helmlm.errors import ConfigError
from helmlm.training.sweep import Sweep, SweepSpec, load_sweep


def spec(corpus: Path, out: Path, **kw) -> SweepSpec:  # noqa: F811
    run_overrides = [o for o in overrides(corpus, out) if not o.startswith("out_dir=")]
    run_overrides += ["train.steps=4", "eval.every=2", "checkpoint.every=2", "checkpoint.keep_last=3"]
    fields = dict(recipe="tiny", models=["helm_d_tiny", "llama_tiny"], lr=[3e-3, 3e-2], embedding_lr=[None],
                  seeds=[0, 1, 2], overrides=run_overrides, out_dir=str(out), threads=1, parallel=2)
    fields.update(kw)
    s = SweepSpec(**fields)
    s.validate()
    return s


def comparable(results: dict, out: Path) -> str:
    """The results without wall times and with the sweep's own directory name removed."""
    results = {k: v for k, v in results.items() if k != "seconds"}
    return json.dumps(results, sort_keys=True).replace(str(out), "OUT")


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted sweep: 2 models x 2 lrs, then 2 more seeds at each model's best lr (8 runs)."""
    out = tmp_path_factory.mktemp("sweep") / "whole"
    return out, Sweep(spec(corpus, out), log=lambda m: None).run()


def test_an_interrupted_sweep_resumes_to_the_same_results(corpus, whole, tmp_path):  # noqa: F811
    """Stopped after 3 runs, the third run then 'killed' (its result and last checkpoint gone, its log ahead of the
    checkpoint), and resumed: the same results.json, table and best points as the uninterrupted sweep."""
    whole_out, whole_results = whole
    assert whole_results["complete"] and len(whole_results["runs"]) == 4 + 2 * 2
    out = tmp_path / "pieces"
    pieces = Sweep(spec(corpus, out), log=lambda m: None)
    assert not pieces.run(max_runs=3)["complete"]
    assert not (out / "curves.png").exists()
    third = pieces.run_dir(pieces.grid()[2])
    (third / "result.json").unlink()
    shutil.rmtree(sorted((third / "checkpoints").iterdir())[-1])  # killed after its step-2 checkpoint
    fourth = pieces.run_dir(pieces.grid()[3])
    fourth.mkdir(parents=True)
    (fourth / "checkpoints").mkdir()  # killed before its first checkpoint
    (fourth / "metrics.jsonl").write_text('{"kind": "eval", "step": 2, "val_loss": 1.0}\n')
    resumed = pieces.run()
    assert comparable(resumed, out) == comparable(whole_results, whole_out)
    assert (out / "results.md").read_text() == (whole_out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000


def test_results_hold_the_best_point_and_seed_statistics(corpus, whole):  # noqa: F811
    out, results = whole
    for row in results["summary"]:
        grid = [r for r in results["runs"] if r["seed"] == 0 and r["model"] == row["model"]]
        best = min(grid, key=lambda r: r["val_loss"])
        assert (row["lr"], row["embedding_lr"], row["seeds"]) == (best["lr"], None, 3)
        at_best = [r["val_loss"] for r in results["runs"] if r["model"] == row["model"] and r["lr"] == best["lr"]]
        assert len(at_best) == 3 and row["val_loss_mean"] == pytest.approx(sum(at_best) / 3)
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(at_best)) and row["val_loss_std"] > 0
        assert f"| {row['model']} | {row['lr']:g} | = lr | 3 | {row['val_loss_mean']:.3f} ± " in \
            (out / "results.md").read_text()
    bytes_per_token = Sweep(spec(corpus, out)).bytes_per_token()
    assert 2 < bytes_per_token < 8
    for r in results["runs"]:
        assert [step for step, _, _ in r["curve"]] == [2, 4] and r["curve"][-1][2] == r["val_loss"]
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / bytes_per_token)


def test_bad_sweeps_are_refused_and_nothing_is_overwritten(corpus, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ConfigError, match=r"no config file or preset named 'lama_tiny' \(did you mean "
                                          r"'llama_tiny'\?\); presets: .*llama_tiny"):
        spec(corpus, tmp_path / "a", models=["helm_d_tiny", "lama_tiny"])
    with pytest.raises(ConfigError, match="lr must be a non-empty list"):
        spec(corpus, tmp_path / "a", lr=[])
    with pytest.raises(ConfigError, match="every embedding_lr must be a number > 0 or null"):
        spec(corpus, tmp_path / "a", embedding_lr=[None, -1.0])
    with pytest.raises(ConfigError, match=r"lr maps models to grids, so it needs exactly the sweep's models "
                                          r"\['helm_d_tiny', 'llama_tiny'\]; got \['helm_d_tiny'\]"):
        spec(corpus, tmp_path / "a", lr={"helm_d_tiny": [1e-3]})
    with pytest.raises(ConfigError, match=r"embedding_lr\[llama_tiny\] must be a non-empty list"):
        spec(corpus, tmp_path / "a", embedding_lr={"helm_d_tiny": [None], "llama_tiny": []})
    held = tmp_path / "held"
    held.mkdir()
    (held / "sweep.json").write_text(json.dumps({"recipe": "tiny", "models": ["other"]}))
    with pytest.raises(ConfigError, match="holds a different sweep"):
        Sweep(spec(corpus, held), log=lambda m: None).run()
    assert [p.name for p in held.iterdir()] == ["sweep.json"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a sweep directory"):
        Sweep(spec(corpus, foreign), log=lambda m: None).run()
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    config = tmp_path / "sweep.yaml"
    config.write_text("recipe: tiny\nmodels: [helm_d_tiny]\nlr: []\n")
    assert main(["sweep", str(config)]) == 2
    assert "lr must be a non-empty list" in capsys.readouterr().err
    config.write_text("recipe: tiny\nmodels: [helm_d_tiny]\nlr: [1e-3]\nlearning_rate: 3\n")
    assert main(["sweep", str(config)]) == 2
    assert "unknown sweep key(s) learning_rate" in capsys.readouterr().err
    from helmlm.training.sweep import SWEEPS_DIR

    assert main(["sweep", "tiny_dens"]) == 2
    err = capsys.readouterr().err
    assert "no sweep config 'tiny_dens' (did you mean 'tiny_dense'?)" in err
    assert "shipped: " + ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))) in err


def test_shipped_sweeps_load_and_cover_lr_and_embedding_lr():
    from helmlm.training.sweep import SWEEPS_DIR

    for path in SWEEPS_DIR.glob("*.yaml"):
        s = load_sweep(path.stem)  # every model x variant builds
        if path.stem in ("tiny_dense", "tiny_moe", "tiny_dense_v1k"):  # the comparisons under the shipped defaults
            assert len(s.seeds) >= 3 and len(s.models) == 2 and not any("_reference" in m for m in s.models), path
            for model in s.models:
                assert len(s.grid_of("lr", model)) >= 2 and len(s.grid_of("embedding_lr", model)) >= 2, path
        if path.stem.startswith("issue15_") or path.stem == "tiny_helm_d_fp64":  # the issue-15 grids
            assert len(s.seeds) >= 3 and all(m.endswith("_reference") for m in s.models), path
            for model in s.models:
                assert len(s.grid_of("lr", model)) >= (3 if path.stem.endswith(("v1k", "fp64")) else 4), path
    assert load_sweep("tiny_dense", ["parallel=1", "lr=[0.001, 0.01]"]).lr == [0.001, 0.01]


def test_the_small_vocabulary_sweep_keeps_the_pair_matched_and_mostly_non_embedding():
    from helmlm.config import load_train_config
    from helmlm.models.params import count_parameters

    for name, tolerance in (("tiny_dense_v1k", 5e-4), ("issue15_tiny_dense_v1k", 2e-4)):
        s = load_sweep(name)
        counts = [count_parameters(load_train_config(s.recipe, [*s.run_overrides(m), "model.vocab_size=1024"])
                                   .model_config()) for m in s.models]
        # (at this vocabulary one FFN unit of the twin is 768 parameters: 0.05 % is as close as widths get)
        assert abs(counts[0]["total"] - counts[1]["total"]) / counts[0]["total"] < tolerance, name
        assert all(c["non_embedding"] >= c["total"] / 2 for c in counts), name
    with pytest.raises(ConfigError, match="model_overrides must map models of the sweep"):
        load_sweep("tiny_dense_v1k", ["model_overrides={gpt2: [model.hidden_size=8]}"])


def test_variants_are_swept_and_seeded_as_arms_of_their_own(corpus, tmp_path):  # noqa: F811
    """An ablation is a variant: its overrides reach its runs (after the point's, so it may set the lr too), and
    it gets its own best point, seeds and table rows."""
    out = tmp_path / "ablation"
    s = spec(corpus, out, models=["llama_tiny"], lr=[3e-3], seeds=[0, 1],
             variants={"base": [], "narrow": ["model.intermediate_size=40"], "slow": ["train.lr=1e-5"],
                       "explode": ["train.lr=1e6", "train.warmup_steps=0", "train.clip=0"]})
    results = Sweep(s, log=lambda m: None).run()
    assert sorted((r["variant"], r["seed"]) for r in results["runs"]) == \
        [("base", 0), ("base", 1), ("explode", 0), ("explode", 1), ("narrow", 0), ("narrow", 1), ("slow", 0),
         ("slow", 1)]
    exploded = [r for r in results["runs"] if r["variant"] == "explode"]
    assert all(r["diverged"] and r["val_loss"] == math.inf and "non-finite" in r["error"] for r in exploded)
    assert all(not r["diverged"] for r in results["runs"] if r["variant"] != "explode")
    run_config = json.loads((out / "runs" / "llama_tiny" / "narrow,lr=0.003,elr=lr,seed=1" / "config.json").read_text())
    assert run_config["model"]["intermediate_size"] == 40
    slow = json.loads((out / "runs" / "llama_tiny" / "slow,lr=0.003,elr=lr,seed=0" / "config.json").read_text())
    assert slow["train"]["lr"] == 1e-5
    by_variant = {row["variant"]: row for row in results["summary"]}
    assert by_variant["slow"]["val_loss_mean"] > by_variant["base"]["val_loss_mean"]  # barely trained
    table = (out / "results.md").read_text()
    assert "| llama_tiny / narrow | 0.003 | = lr | 2 |" in table and "**llama_tiny / slow**" in table
    assert "| 0.003 | diverged |" in table


def test_each_model_may_have_its_own_grid(corpus, tmp_path):  # noqa: F811
    """``lr`` / ``embedding_lr`` as mappings: each model runs its own grid (e.g. each at its tuned point)."""
    out = tmp_path / "own"
    s = spec(corpus, out, lr={"helm_d_tiny": [3e-3], "llama_tiny": [1e-2, 3e-3]},
             embedding_lr={"helm_d_tiny": [None], "llama_tiny": [0.1]}, seeds=[0])
    results = Sweep(s, log=lambda m: None).run()
    assert sorted((r["model"], r["lr"], r["embedding_lr"]) for r in results["runs"]) == \
        [("helm_d_tiny", 3e-3, None), ("llama_tiny", 3e-3, 0.1), ("llama_tiny", 1e-2, 0.1)]
    config = json.loads((out / "runs" / "llama_tiny" / "lr=0.01,elr=0.1,seed=0" / "config.json").read_text())
    assert (config["train"]["lr"], config["train"]["embedding_lr"]) == (1e-2, 0.1)
    table = (out / "results.md").read_text()
    assert "**helm_d_tiny**\n\n| lr | = lr |\n|---|---|\n| 0.003 |" in table
    assert "**llama_tiny**\n\n| lr | 0.1 |\n|---|---|\n| 0.01 |" in table


def test_runs_go_under_torchrun_with_nproc(corpus, tmp_path):  # noqa: F811
    """``nproc=2``: each run is a 2-process torchrun job (gloo on CPU), whose global batch is twice the rows."""
    runs = {}
    for n in (1, 2):
        s = spec(corpus, tmp_path / f"n{n}", models=["llama_tiny"], lr=[3e-3], seeds=[0], nproc=n, parallel=1)
        runs[n] = Sweep(s, log=lambda m: None).run()["runs"][0]
    assert not runs[2]["diverged"] and math.isfinite(runs[2]["val_loss"])
    per_step = {n: r["curve"][0][1] / r["curve"][0][0] for n, r in runs.items()}
    assert per_step[2] / per_step[1] == pytest.approx(2, rel=0.05)  # tokens counted are real targets
    with pytest.raises(ConfigError, match="nproc must be an integer >= 1"):
        spec(corpus, tmp_path / "bad", nproc=0)


def test_one_seed_tables_show_no_spread():
    """A sweep with one seed (the small-scale comparison) reports each arm's loss without a ``± nan``; with two
    seeds the spread is there."""
    from helmlm.training.sweep import markdown_table, summarise

    for seeds in ([1234], [1234, 1]):
        spec = load_sweep("small_moe", [f"seeds={seeds}"])
        runs = [{"model": m, "variant": "base", "lr": lr, "embedding_lr": spec.grid_of("embedding_lr", m)[0],
                 "seed": seed, "val_loss": 4.5 + lr + 0.01 * i, "val_bpb": 1.6 + lr, "diverged": False}
                for i, seed in enumerate(seeds) for m in spec.models for lr in spec.lr]
        table = markdown_table(runs, summarise(runs, spec), spec)
        assert "nan" not in table
        rows = [line for line in table.split("Grid")[0].splitlines() if line.startswith(("| helm", "| deepseek"))]
        assert len(rows) == 2 and all((" ± " in row) == (len(seeds) > 1) for row in rows)
