"""The trainer end to end on a small local corpus: config validation, loss going down, exact resume after SIGKILL,
2-process DDP equal to 1 process, checkpoints, and every bad-input path (each must fail clearly and keep what was
already written)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helmlm.config import load_train_config
from helmlm.models.config import ConfigError
from helmlm.training.checkpoint import latest_checkpoint
from helmlm.training.trainer import NonFiniteLossError, Trainer, TrainingError, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A JSONL corpus of 400 short pseudo-English documents (deterministic)."""
    rng = np.random.default_rng(0)
    words = ("the of and to in a is that it was for on are as with his they at be this from have or by one had not "
             "but what all were when we there can an your which their said if do will each about how up out them "
             "then she many some so these would other into has more her two like him see time could no make than "
             "first been its who now people my made over did down only way find use may water long little very after "
             "words called just where most know").split()
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(400):
            # a little grammar: each document repeats a few "phrases", so there is something to learn quickly
            phrases = [" ".join(rng.choice(words, 4)) for _ in range(3)]
            n = int(rng.integers(2, 30))
            f.write(json.dumps({"text": ". ".join(phrases[int(rng.integers(3))] for _ in range(n)) + "."}) + "\n")
    return root / "docs.jsonl"


def overrides(corpus: Path, tmp: Path, *extra: str) -> list[str]:
    """A tiny, fast run on ``corpus``; the prepared data is shared by every run of the module."""
    return [f"data.paths={corpus}", "data.source=local", "data.vocab_size=400", "data.val_fraction=0.05",
            f"data.dir={corpus.parent / 'prepared'}", "model.vocab_size=400", "model.num_hidden_layers=1",
            "train.seq_len=32", "train.micro_batch=4", "train.steps=12", "train.lr=3e-3",
            "train.embedding_lr=null", "train.threads=1", "eval.every=6", "eval.rows=16", "log.every=1",
            "log.progress=false", "log.tensorboard=false",
            "checkpoint.every=4", "checkpoint.keep_last=2", f"out_dir={tmp}", *extra]


def metrics(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "helmlm", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, **kw)


# ------------------------------------------------------------------------------------------------ configuration


def test_shipped_recipe_loads_and_overrides_apply():
    config = load_train_config("tiny", ["train.lr=1e-3", "model.num_hidden_layers=3", "train.precision=bf16",
                                        "data.paths=a.txt,b.txt", "train.warmup_steps=null"])
    assert config.train.lr == 1e-3 and isinstance(config.train.lr, float)
    assert config.model_config().num_hidden_layers == 3 and config.model == {"preset": "helm_d_tiny",
                                                                            "num_hidden_layers": 3}
    assert config.data.paths == ["a.txt", "b.txt"] and config.train.warmup_steps is None
    assert load_train_config("tiny", ["model=llama_tiny"]).model_config().geometry == "euclidean"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1e-3", "train.lrr (did you mean train.lr?)"),
    ("trian.lr=1e-3", "trian (did you mean config.train?)"),
    ("model.hiden_size=64", "model.hiden_size (did you mean model.hidden_size?)"),
    ("train.steps=many", "train.steps must be of type int, got 'many'"),
    ("train.micro_batch=2.5", "train.micro_batch must be of type int"),
    ("log.progress=maybe", "log.progress must be of type bool"),
    ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1]"),
    ("train.table_dtype=float16", "train.table_dtype must be float32 or float64, got 'float16'"),
    ("train.cpu_malloc=jemalloc", "train.cpu_malloc must be one of keep, system; got 'jemalloc'"),
    ("data.source=web", "data.source must be one of builtin, local, hf"),
    ("train.lr", "not of the form key=value"),
])
def test_bad_config_values_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_train_config("tiny", [override])
    assert message in str(err.value)


def test_settings_for_a_table_of_points_are_refused_without_one():
    """``train.table_dtype`` and ``train.riemannian_lr`` concern a table of Lorentz points (Riemannian Adam): for the
    space-part table of the shipped HELM presets and for the twins' table they are errors, not silently ignored."""
    with pytest.raises(ConfigError, match=r"train.table_dtype=float64 applies to a table of Lorentz points .* table "
                                          r"of space parts \(model.project_emb=true\).*or set model.project_emb=false"):
        load_train_config("tiny", ["train.table_dtype=float64"])
    with pytest.raises(ConfigError, match=r"train.riemannian_lr=0.1 applies .* a Euclidean token table. Remove "
                                          r"train.riemannian_lr$"):
        load_train_config("tiny", ["model=llama_tiny", "train.riemannian_lr=0.1"])
    for model in ("helm_d_tiny_reference", "helm_d_tiny model.project_emb=false"):
        name, *extra = model.split()
        config = load_train_config("tiny", [f"model={name}", *extra, "train.table_dtype=float64"])
        assert config.train.table_dtype == "float64"


def test_unknown_key_in_yaml_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: helm_d_tiny\ntrain:\n  sequence_len: 64\n")
    with pytest.raises(ConfigError, match=r"train.sequence_len \(did you mean train.seq_len\?\)"):
        load_train_config(path)


def test_preset_train_settings_sit_under_the_recipe_and_the_command_line(tmp_path):
    """A preset's ``train:`` section (its tuned rates) applies unless the recipe or the command line sets the same
    key; a preset's ``base:`` starts from another preset's model fields."""
    preset = tmp_path / "mine.yaml"
    preset.write_text("model:\n  base: helm_d_tiny\n  num_hidden_layers: 1\n"
                      "train:\n  lr: 5.0e-3\n  embedding_lr: 0.05\n  warmup_ratio: 0.2\n")
    config = load_train_config("tiny", [f"model={preset}"])
    assert (config.train.lr, config.train.embedding_lr, config.train.warmup_ratio) == (5e-3, 0.05, 0.05)  # recipe
    assert config.model_config().num_hidden_layers == 1 and config.model_config().hidden_size == 130
    assert load_train_config("tiny", [f"model={preset}", "train.lr=1e-3"]).train.lr == 1e-3
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {preset}\ntrain:\n  lr: 2.0e-3\n")
    assert load_train_config(recipe).train.lr == 2e-3
    assert load_train_config(recipe).train.embedding_lr == 0.05
    preset.write_text("model:\n  base: helm_d_tiny\ntrain:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train.lr must be of type float, got 'fast'"):
        load_train_config("tiny", [f"model={preset}"])
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"model:\n  base: {loop}\n")
    with pytest.raises(ConfigError, match="base presets form a loop"):
        load_train_config("tiny", [f"model={loop}"]).model_config()


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    result = cli("train", "tiny", "train.lrr=1", f"out_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "did you mean train.lr?" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- training works


@pytest.mark.parametrize("policy", ["keep", "system"])
def test_trainer_sets_the_cpu_malloc_policy(corpus, tmp_path, monkeypatch, policy):
    """Training on CPU applies ``train.cpu_malloc`` once, at construction (its effect: test_performance.py)."""
    import helmlm.training.trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "apply_cpu_malloc", calls.append)
    Trainer(load_train_config(None, overrides(corpus, tmp_path, "train.device=cpu", f"train.cpu_malloc={policy}")))
    assert calls == [policy]


@pytest.mark.parametrize("model", ["helm_d_tiny", "llama_tiny", "helm_mice_tiny", "helm_d_tiny_reference"])
def test_loss_decreases(corpus, tmp_path, model):
    """Validation loss after 12 steps is clearly below the loss at initialisation (ln 400 ~ 6.0); the health
    records report the Lorentz table's radius (and, for a table of points, its constraint violation)."""
    layers = 2 if model == "helm_mice_tiny" else 1  # the first MiCE layer is dense
    config = load_train_config(None, overrides(corpus, tmp_path, f"model.preset={model}",
                                               f"model.num_hidden_layers={layers}"))
    trainer = Trainer(config)
    initial = trainer.evaluate()["val_loss"]
    final = trainer.fit()
    assert final["val_loss"] < initial - 0.5, (initial, final)
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    if model == "helm_mice_tiny":
        health = metrics(tmp_path, "health")[-1]
        assert health["expert_curvatures"] and health["expert_load"]
        assert abs(sum(next(iter(health["expert_load"].values()))) - 1) < 1e-6
    if model != "llama_tiny":
        health = metrics(tmp_path, "health")[-1]
        assert 0 < health["embedding_radius"] < 10
        assert ("embedding_violation" in health) == model.endswith("_reference")
        if model.endswith("_reference"):
            assert health["embedding_violation"] < 1e-5


def test_checkpoints_are_complete_and_only_the_last_ones_kept(corpus, tmp_path):
    train(load_train_config(None, overrides(corpus, tmp_path, "log.tensorboard=true", "train.precision=bf16")))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard scalars were written
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000008", "step-00000012"]
    assert (root / "latest").read_text().strip() == "step-00000012"
    ckpt = root / "step-00000012"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 12 and state["data_position"] == 12 * 4 and state["config"]["train"]["steps"] == 12
    # A crash while writing leaves a temporary directory and possibly a stale pointer: neither is ever "latest".
    (root / ".tmp-step-00000016-999").mkdir()
    (root / "latest").write_text("step-00000016\n")
    assert latest_checkpoint(tmp_path) == ckpt


# ------------------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("model", ["helm_d_tiny", "helm_d_tiny_reference"])
def test_resume_after_sigkill_is_bit_identical(corpus, tmp_path, model):
    """A run killed with SIGKILL right after its step-4 checkpoint, then resumed, ends with parameters and optimizer
    state bit-identical to an uninterrupted run of the same length: with the shipped table (space parts, AdamW) and
    with the reference's (Lorentz points, Riemannian Adam)."""
    base = overrides(corpus, tmp_path / "a", f"model.preset={model}", "train.steps=10", "checkpoint.every=4")
    Trainer(load_train_config(None, base))  # prepare the data outside the timed subprocesses
    straight = cli("train", *base)
    assert straight.returncode == 0, straight.stderr

    killed_args = overrides(corpus, tmp_path / "b", f"model.preset={model}", "train.steps=10", "checkpoint.every=4")
    proc = subprocess.Popen([sys.executable, "-m", "helmlm", "train", *killed_args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = tmp_path / "b" / "checkpoints" / "step-00000004" / "state.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert latest_checkpoint(tmp_path / "b").name in ("step-00000004", "step-00000008")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # as if the kill had torn the last line
    resumed = cli("train", *killed_args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(latest_checkpoint(tmp_path / "a") / name)
        b = load_file(latest_checkpoint(tmp_path / "b") / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in metrics(tmp_path / "a")] == [r["loss"] for r in metrics(tmp_path / "b")]


def test_float64_table_trains_and_resumes_exactly(corpus, tmp_path):
    """``train.table_dtype=float64``: the Lorentz table and its Riemannian Adam state are float64 (in the
    checkpoint too), the first loss is the float32 run's (lookups return the same float32 values), and a run resumed
    from its step-4 checkpoint ends bit-identical to the uninterrupted one."""
    points = "model.preset=helm_d_tiny_reference"  # a table of Lorentz points (the shipped table is space parts)
    a = tmp_path / "a"
    train(load_train_config(None, overrides(corpus, a, points, "train.steps=8", "train.table_dtype=float64")))
    ckpt = latest_checkpoint(a)
    assert load_file(ckpt / "model.safetensors")["model.embed.weight"].dtype == torch.float64
    moments = {k: v for k, v in load_file(ckpt / "optimizer.safetensors").items() if k.startswith("opt1.")}
    assert moments and all(v.dtype == torch.float64 for v in moments.values() if v.is_floating_point())
    train(load_train_config(None, overrides(corpus, tmp_path / "f32", points, "train.steps=1")))
    assert metrics(a)[0]["loss"] == pytest.approx(metrics(tmp_path / "f32")[0]["loss"], rel=1e-6)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000008")
    (b / "checkpoints" / "latest").write_text("step-00000004\n")
    train(load_train_config(None, overrides(corpus, b, points, "train.steps=8", "train.table_dtype=float64")),
          resume=True)
    final_a, final_b = final_weights(a), final_weights(b)
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_with_another_config_is_refused_and_changes_nothing(corpus, tmp_path):
    train(load_train_config(None, overrides(corpus, tmp_path, "train.steps=4")))
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match=r"another config \(train.lr: 0.003 in the checkpoint, 0.001 now"):
        Trainer(load_train_config(None, overrides(corpus, tmp_path, "train.steps=4", "train.lr=1e-3")), resume=True)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        Trainer(load_train_config(None, overrides(corpus, tmp_path, "train.steps=4")))
    with pytest.raises(TrainingError, match="no checkpoint"):
        Trainer(load_train_config(None, overrides(corpus, tmp_path / "empty")), resume=True)
    assert before == {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------- bad input


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    """From step 6 on the logits turn NaN (a forward hook stands in for a divergence): the run stops at step 6 with a
    message naming it, before updating, and the step-5 checkpoint stays the latest, with finite weights."""
    trainer = Trainer(load_train_config(None, overrides(corpus, tmp_path, "checkpoint.every=1")))
    trainer.model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step >= 5 else out)
    before = trainer.model.lm_head.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 6; stopped before updating") as err:
        trainer.fit()
    last = latest_checkpoint(tmp_path)
    assert last.name == "step-00000005" and f"last good checkpoint is {last}" in str(err.value)
    assert torch.equal(load_file(last / "model.safetensors")["lm_head.weight"], trainer.model.lm_head.weight)
    assert not torch.equal(before, trainer.model.lm_head.weight)  # it did train up to step 5


def test_non_finite_parameters_are_never_checkpointed(corpus, tmp_path):
    """An absurd learning rate makes the weights overflow in the first update: no checkpoint is written."""
    config = load_train_config(None, overrides(corpus, tmp_path, "train.lr=1e30", "train.warmup_steps=0",
                                               "train.clip=0", "checkpoint.every=1"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* step 1.*no checkpoint was written yet"):
        train(config)
    assert latest_checkpoint(tmp_path) is None


def test_vocab_mismatch_is_an_error(corpus, tmp_path):
    with pytest.raises(TrainingError, match=r"tokenizer has 400 token ids but the model's vocab_size is 300"):
        Trainer(load_train_config(None, overrides(corpus, tmp_path, "model.vocab_size=300")))
    assert not (tmp_path / "checkpoints").exists()


def test_empty_corpus_is_an_error_from_the_cli(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
    result = cli("train", "tiny", "data.source=local", f"data.paths={tmp_path / 'empty.jsonl'}",
                 f"data.dir={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "empty" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- distributed


def _adam_ratio_bound(beta1: float, beta2: float, steps: int) -> float:
    """max over t <= steps of max |m_hat / sqrt(v_hat)| for bias-corrected Adam: m_hat = sum_s w_s g_s and
    v_hat = sum_s u_s g_s^2 with w_s = (1-beta1) beta1^(t-s) / (1-beta1^t), u_s likewise, so by Cauchy-Schwarz
    |m_hat| <= sqrt(sum_s w_s^2 / u_s) sqrt(v_hat) (1 at t = 1; eps > 0 only lowers the ratio)."""
    def at(t: int) -> float:
        w = [(1 - beta1) * beta1 ** (t - s) / (1 - beta1 ** t) for s in range(1, t + 1)]
        u = [(1 - beta2) * beta2 ** (t - s) / (1 - beta2 ** t) for s in range(1, t + 1)]
        return sum(a * a / b for a, b in zip(w, u)) ** 0.5
    return max(at(t) for t in range(1, steps + 1))


def test_close_drops_the_ddp_wrapper_before_leaving_the_group(tmp_path, monkeypatch):
    """``Trainer.close()`` (the end of every ``train``) destroys DDP's wrapper, and with it its ``Reducer``, while
    the process group is still registered, so the group's last reference goes from Python, whose destructor
    releases the GIL (a gloo worker thread waiting for the GIL hung a torchrun job at exit otherwise)."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from helmlm.training.distributed import Distributed

    destroy = dist.destroy_process_group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        trainer = object.__new__(Trainer)  # only what close() touches
        trainer.env = Distributed(rank=0, world_size=2)  # 'active', as on several ranks
        trainer.model = torch.nn.Linear(3, 2)
        trainer.wrapped = DistributedDataParallel(trainer.model)
        wrapper, seen = weakref.ref(trainer.wrapped), {}

        def watched_destroy(*args, **kwargs):
            seen.update(wrapper_alive=wrapper() is not None, group_registered=dist.is_initialized())
            destroy(*args, **kwargs)

        monkeypatch.setattr(dist, "destroy_process_group", watched_destroy)
        trainer.close()
        assert seen == {"wrapper_alive": False, "group_registered": True}
        assert not dist.is_initialized() and trainer.wrapped is trainer.model
        trainer.close()  # a second call (nothing left to leave) is a no-op
    finally:
        if dist.is_initialized():
            destroy()
        gc.collect()


@pytest.mark.parametrize("model, strategy", [("helm_d_tiny", "ddp"), ("helm_mice_tiny", "ddp"), ("helm_d_tiny", "fsdp"),
                                             pytest.param("helm_mice_tiny", "fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one(corpus, tmp_path, model, strategy):
    """torchrun with 2 gloo processes (micro-batch 2 each) follows the same trajectory as 1 process with micro-batch
    4: same losses, and parameters within Adam's bound everywhere and equal to a tiny fraction of the distance
    travelled overall (MiCE: also the all-reduced bias update; FSDP: sharded Euclidean parts, the Lorentz table
    replicated and averaged by hand, checkpoints gathered whole, and the chunked loss with checkpointed blocks)."""
    from helmlm.training.optim import lr_multiplier, parameter_roles

    accumulation = 2 if model == "helm_mice_tiny" else 1  # expert counts must survive micro-batches on every rank
    common = overrides(corpus, tmp_path, f"model.preset={model}", "train.steps=6", "checkpoint.every=6",
                       "model.num_hidden_layers=2", f"train.grad_accum={accumulation}")
    warm = Trainer(load_train_config(None, [*common, f"out_dir={tmp_path / 'warm'}"]))  # prepares the data once
    start = {k: v.detach().clone() for k, v in warm.model.state_dict().items()}  # the runs' initial weights (seed)
    manifold = {k for k, role in parameter_roles(warm.model).items() if role == "manifold"}
    one = cli("train", *common, f"out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # FSDP also runs the memory options (chunked loss, checkpointed blocks), which must not change the trajectory
    options = ["train.loss_chunk_tokens=24", "train.activation_checkpointing=true"] if strategy == "fsdp" else []
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), "-m", "helmlm", "train", *common,
                          "train.micro_batch=2", f"train.strategy={strategy}", f"out_dir={tmp_path / 'two'}",
                          *options],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    la = [r["loss"] for r in metrics(tmp_path / "one")]
    lb = [r["loss"] for r in metrics(tmp_path / "two")]
    assert len(la) == len(lb) == 6 and np.allclose(la, lb, rtol=1e-5, atol=0)
    va, vb = metrics(tmp_path / "one", "eval")[-1], metrics(tmp_path / "two", "eval")[-1]
    assert va["val_tokens"] == vb["val_tokens"] and abs(va["val_loss"] - vb["val_loss"]) < 1e-5
    # Weights: no fixed float tolerance holds, because Adam divides by sqrt(v_hat): on a coordinate whose gradient
    # is ~0, the ~1e-7 relative differences of the all-reduce order (amplified along the trajectory) become a
    # sizeable part of a step. The worst coordinates are such ones (MiCE, 6 steps, lr 3e-3: 2.8e-5 on an AMD EPYC
    # in layers.1.attn.wq.weight, rms gradient 3.5e-6 against a tensor median of 9.2e-6; 6.1e-5 under
    # ATEN_CPU_CAPABILITY=default; 4e-4 reported on an Intel Xeon), while per-tensor medians are 0-3e-7.
    # (A) Adam's step bound: one step moves a coordinate by lr_t |m_hat / (sqrt(v_hat) + eps)| <= lr_t R with R from
    # _adam_ratio_bound (1.0042 for betas (0.9, 0.95), 6 steps), and decoupled weight decay only shrinks a
    # difference, so every coordinate of the two runs differs by <= 2 R sum_t lr_t (2.0e-2 here: the envelope
    # that a noise-dominated coordinate may fill), and run one lies within sum_t lr_t (R + wd |w|) of the start
    # (checks R and the captured start). Float32 rounding of the stored weights (<= 6 ulp) is far below both.
    # Riemannian Adam's table (a retraction, not a per-coordinate step) and buffers only enter (B).
    # (B) The trajectory: the RMS difference over all weights is <= 1% of the RMS distance travelled (6.0e-3).
    # A noise-dominated coordinate differs by at most twice its displacement, so 1% admits a fraction
    # (1% / 2)^2 = 2.5e-5 of the coordinates (22 of MiCE's 897k) at the full bound of (A), or 100x as many at a
    # tenth of a step; measured 2.8e-5 (AMD EPYC) / 5.1e-5 (default kernels), whereas a rank that skips the
    # gradient all-reduce (a run on half the batch) gives 0.66.
    t = warm.config.train
    lrs = [t.lr * lr_multiplier(s, t.steps, t.resolved_warmup(), t.min_lr_ratio) for s in range(t.steps)]
    bound = _adam_ratio_bound(t.beta1, t.beta2, t.steps)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys() == start.keys()
    params, diff2, travelled2 = dict(warm.model.named_parameters()), 0.0, 0.0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        diff, moved = (a[k] - b[k]).abs().double(), (a[k] - start[k]).abs().double()
        diff2, travelled2 = diff2 + diff.square().sum().item(), travelled2 + moved.square().sum().item()
        if k in params and k not in manifold:
            assert diff.max().item() <= 2 * bound * sum(lrs), k
            largest_weight = start[k].abs().double() + bound * sum(lrs)
            assert (moved <= sum(lrs) * (bound + t.weight_decay * largest_weight)).all(), k
    assert diff2 ** 0.5 <= 0.01 * travelled2 ** 0.5


@pytest.mark.slow
def test_fsdp_resume_is_bit_identical(corpus, tmp_path):
    """2-process FSDP: resuming from the step-3 checkpoint (gathered whole, re-sharded on load) ends with the same
    parameters and optimizer state, bit for bit, as the uninterrupted FSDP run."""
    common = overrides(corpus, tmp_path, "train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=3",
                       "train.micro_batch=2", "train.strategy=fsdp")
    Trainer(load_train_config(None, [*common, f"out_dir={tmp_path / 'warm'}"]))  # prepare data once
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(29500 + os.getpid() % 1000), "-m", "helmlm", "train", *common,
                                 *args], capture_output=True, text=True, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(f"out_dir={tmp_path / 'a'}")
    torchrun(f"out_dir={tmp_path / 'b'}")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-00000003\n")
    torchrun(f"out_dir={tmp_path / 'b'}", "--resume")
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step-00000006" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-00000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_export_gives_a_hugging_face_directory_with_the_tokenizer(corpus, tmp_path):
    """``helmlm export`` of a training run: AutoModelForCausalLM/AutoTokenizer load it, the logits equal the trained
    model's; an existing non-empty output directory or a missing checkpoint is refused without writing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helmlm.training.export import ExportError, export_checkpoint

    trainer = Trainer(load_train_config(None, overrides(corpus, tmp_path / "run", "train.steps=3")))
    trainer.fit()
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("the time of water").input_ids])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trainer.model(ids).logits)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf")
    data_tok = Path(trainer.config.data.dir) / "tokenizer"
    assert export_checkpoint(tmp_path / "run", tmp_path / "hf2", tokenizer=data_tok).is_dir()
    result = cli("export", str(tmp_path / "run" / "checkpoints" / "nope"), str(tmp_path / "hf3"))
    assert result.returncode == 2 and "neither a checkpoint" in result.stderr and not (tmp_path / "hf3").exists()
