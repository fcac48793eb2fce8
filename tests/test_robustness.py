"""Runs that survive damage and grow, weights that start new runs, honest sampling and clean output (issue 10).

Each test damages, extends or misuses something the way a user would, then checks what the library did and what it
said: the fallback checkpoint and the message naming the damaged one, the learning-rate schedule after ``--extend``,
the weights a ``train.init_from`` run starts with, fresh randomness without ``--seed``, no deprecation noise.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from test_train import cli, corpus, metrics, overrides  # noqa: F401  (corpus is a fixture)

from helmlm.config import load_train_config
from helmlm.generation import SamplingSettings, generate
from helmlm.models import HELMForCausalLM, load_config
from helmlm.models.config import ConfigError
from helmlm.training.checkpoint import latest_checkpoint, read_checkpoint_state
from helmlm.training.export import export_checkpoint
from helmlm.training.optim import lr_multiplier
from helmlm.training.trainer import Trainer, TrainingError, train


def step_dir(run, step: int):
    return run / "checkpoints" / f"step-{step:08d}"


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- damaged checkpoints


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path, capfd):
    """The step-8 weights lose their last 100 bytes: ``--resume`` says so, resumes from step 4, and the rerun
    rewrites step 8 bit-identical to the original (resume is exact)."""
    args = overrides(corpus, tmp_path, "train.steps=8")
    train(load_train_config(None, args))
    damaged = step_dir(tmp_path, 8) / "model.safetensors"
    original = {k: v.clone() for k, v in load_file(damaged).items()}  # load_file maps the file: copy before damage
    damaged.write_bytes(damaged.read_bytes()[:-100])
    capfd.readouterr()

    trainer = Trainer(load_train_config(None, args), resume=True)
    err = capfd.readouterr().err
    assert trainer.step == 4
    assert "skipping checkpoint step-00000008" in err and "truncated" in err
    assert f"using {step_dir(tmp_path, 4)} (step 4), the newest intact checkpoint" in err
    trainer.fit()
    assert weights_equal(load_file(damaged), original)


def test_corrupted_checkpoint_is_named_and_resume_path_chooses_one(corpus, tmp_path):
    """One flipped byte (same size) is caught by the checksum: export of the run falls back with a warning, export
    or resume of that very checkpoint is refused naming the file, ``--resume PATH`` resumes from the one named."""
    args = overrides(corpus, tmp_path, "train.steps=8")
    train(load_train_config(None, args))
    damaged = step_dir(tmp_path, 8) / "optimizer.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    exported = cli("export", str(tmp_path), str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr
    assert "skipping checkpoint step-00000008" in exported.stderr and "sha256 differs" in exported.stderr
    named = cli("export", str(step_dir(tmp_path, 8)), str(tmp_path / "model2"))
    assert named.returncode == 2 and "optimizer.safetensors is damaged" in named.stderr
    assert "Traceback" not in named.stderr and not (tmp_path / "model2").exists()

    refused = cli("train", *args, "--resume", str(step_dir(tmp_path, 8)))
    assert refused.returncode != 0 and "optimizer.safetensors is damaged" in refused.stderr
    assert "Traceback" not in refused.stderr
    resumed = cli("train", *args, "--resume", str(step_dir(tmp_path, 4)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {step_dir(tmp_path, 4)} (step 4" in resumed.stderr
    assert read_checkpoint_state(latest_checkpoint(tmp_path))["step"] == 8


# ------------------------------------------------------------------------------------- extending, init_from


def test_extend_continues_a_finished_run_on_the_replanned_schedule(corpus, tmp_path):
    """A finished 6-step run is extended to 9 steps: plain ``--resume`` with more steps is refused with a hint, a
    smaller target or ``--extend`` alone are refused, and ``--extend`` runs steps 7-9 with the cosine re-planned
    over 9 steps (the stated rule: lr(step) = lr_multiplier(step, new total))."""
    base = overrides(corpus, tmp_path, "train.steps=6", "checkpoint.every=3", "train.warmup_steps=2")
    train(load_train_config(None, base))
    longer = load_train_config(None, [*base, "train.steps=9"])
    with pytest.raises(TrainingError, match="add --extend"):
        Trainer(longer, resume=True)
    with pytest.raises(TrainingError, match=r"train.steps=5 must be larger than the checkpoint's step 6"):
        Trainer(load_train_config(None, [*base, "train.steps=5"]), resume=True, extend=True)
    with pytest.raises(TrainingError, match="together with --resume"):
        Trainer(longer, extend=True)

    trainer = Trainer(longer, resume=True, extend=True)
    assert trainer.step == 6
    trainer.fit()
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 10))
    t = longer.train
    for r in records[6:]:
        assert r["lr"] == pytest.approx(t.lr * lr_multiplier(r["step"] - 1, 9, 2, t.min_lr_ratio), rel=1e-12)
    assert records[6]["lr"] > records[5]["lr"]  # the stretched cosine is above the old schedule's last value
    assert read_checkpoint_state(latest_checkpoint(tmp_path))["config"]["train"]["steps"] == 9


def test_init_from_a_checkpoint_and_from_an_exported_model(corpus, tmp_path):
    """``train.init_from`` starts a new run (step 0, fresh optimizer state, its own seed) with exactly the source's
    weights, from a run directory and from a ``helmlm export`` directory; another architecture, another tokenizer
    or a missing path are refused with what to do."""
    train(load_train_config(None, overrides(corpus, tmp_path / "src", "train.steps=4")))
    source = load_file(latest_checkpoint(tmp_path / "src") / "model.safetensors")
    export_checkpoint(tmp_path / "src", tmp_path / "model")

    for name, origin in (("a", tmp_path / "src"), ("b", tmp_path / "model")):
        trainer = Trainer(load_train_config(None, overrides(corpus, tmp_path / name, f"train.init_from={origin}",
                                                            "train.seed=99", "train.steps=2")))
        assert trainer.step == 0
        for opt_state in trainer.optimizer.state_dict()["optimizers"]:  # created up front on CPU, as at step 0
            for state in opt_state["state"].values():
                assert all(not torch.is_tensor(v) or not v.any() for v in state.values()) and state["step"] == 0
        assert weights_equal({k: v for k, v in trainer.model.state_dict().items()}, source)
        result = trainer.fit()
        assert result["val_loss"] < 5.8  # it starts trained: a fresh tiny model is at ln(400) ~ 6.0 after 2 steps

    with pytest.raises(TrainingError, match=r"another architecture.*num_hidden_layers: 1 there, 2 here"):
        Trainer(load_train_config(None, overrides(corpus, tmp_path / "c", f"train.init_from={tmp_path / 'src'}",
                                                  "model.num_hidden_layers=2")))
    other_data = [f"data.dir={tmp_path / 'other-data'}", "data.vocab_size=380"]
    with pytest.raises(TrainingError, match="another tokenizer"):
        Trainer(load_train_config(None, overrides(corpus, tmp_path / "d", f"train.init_from={tmp_path / 'src'}",
                                                  *other_data)))
    with pytest.raises(TrainingError, match="does not exist"):
        Trainer(load_train_config(None, overrides(corpus, tmp_path / "e", f"train.init_from={tmp_path / 'nope'}")))
    assert not (tmp_path / "c" / "checkpoints").exists() and not (tmp_path / "e" / "checkpoints").exists()


def test_model_vocabulary_follows_a_smaller_tokenizer(corpus, tmp_path, capfd):
    """Without ``model.vocab_size`` the model is sized to the 400-token BPE (the preset has 8,192), says so, and
    the exported model has that vocabulary."""
    args = [a for a in overrides(corpus, tmp_path, "train.steps=2") if not a.startswith("model.vocab_size")]
    trainer = Trainer(load_train_config(None, args))
    assert load_config("helm_d_tiny").vocab_size == 8192
    assert trainer.model_config.vocab_size == 400 == trainer.model.lm_head.out_features
    assert "the model's vocabulary follows the tokenizer: 400 ids instead of the preset's 8,192" in capfd.readouterr().err
    trainer.fit()
    export_checkpoint(tmp_path, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["vocab_size"] == 400


# ---------------------------------------------------------------------------------------------------- sampling


def test_unseeded_sampling_differs_and_seeded_sampling_repeats():
    torch.manual_seed(0)
    model = HELMForCausalLM(load_config("helm_d_tiny", vocab_size=97, num_hidden_layers=1))
    prompt = [[5, 6, 7]]

    def sample(seed):
        return generate(model, prompt, SamplingSettings(max_new_tokens=24, temperature=1.0, seed=seed))

    assert sample(None) != sample(None)  # a near-uniform distribution over 97 ids: equal with probability 97^-24
    assert sample(7) == sample(7)


# ------------------------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def run_and_model(corpus, tmp_path_factory):
    """A 2-step training run (through the CLI, its output kept) and its exported model directory."""
    root = tmp_path_factory.mktemp("cli")
    result = cli("train", *overrides(corpus, root / "run", "train.steps=2", "log.tensorboard=false"))
    assert result.returncode == 0, result.stderr
    export_checkpoint(root / "run", root / "model")
    return root / "run", root / "model", result


def test_train_ends_with_a_summary_and_prints_no_deprecation(run_and_model):
    run, _, result = run_and_model
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("done in ") and "step 2/2, train loss" in last and "val loss" in last
    assert last.endswith(f"checkpoint {latest_checkpoint(run)}")
    assert "deprecat" not in (result.stdout + result.stderr).lower()


def test_exported_files_are_readable_and_the_tokenizer_knows_the_context(run_and_model):
    from transformers import AutoTokenizer

    _, model, _ = run_and_model
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in model.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    assert AutoTokenizer.from_pretrained(model).model_max_length == context == 256


def test_generate_is_fresh_without_a_seed_and_repeats_with_one(run_and_model):
    """Two unseeded calls differ and report their seeds; ``--seed`` with a reported seed repeats that call."""
    _, model, _ = run_and_model
    common = ("generate", str(model), "--prompt", "the", "--max-new-tokens", "16", "--temperature", "1.0", "--json")
    first, second = cli(*common), cli(*common)
    assert first.returncode == second.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["seed"] != b["seed"] and a["completion"] != b["completion"]
    again = cli(*common, "--seed", str(a["seed"]))
    assert json.loads(again.stdout)["completion"] == a["completion"]
    verbose = cli("generate", str(model), "--prompt", "the", "--max-new-tokens", "2", "--seed", "3", "--verbose")
    assert verbose.returncode == 0 and "seed 3" in verbose.stderr
    for result in (first, second, again, verbose):
        assert "deprecat" not in (result.stdout + result.stderr).lower()


def test_generate_on_a_run_directory_says_to_export_and_errors_start_a_line(run_and_model):
    run, model, _ = run_and_model
    result = cli("generate", str(run), "--prompt", "the")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"export it first: `helmlm export {run} OUT_DIR`" in result.stderr
    too_long = cli("generate", str(model), "--prompt", "the", "--max-new-tokens", "256")
    assert too_long.returncode == 2 and too_long.stdout == ""  # refused before the prompt is echoed
    assert too_long.stderr.startswith("error: prompt of") and "context window of 256" in too_long.stderr


# -------------------------------------------------------------------------------------------- smaller points


def test_habitual_key_names_get_a_suggestion():
    for key, ours in (("train.learning_rate", "train.lr"), ("train.batch_size", "train.micro_batch"),
                      ("train.max_steps", "train.steps")):
        with pytest.raises(ConfigError, match=rf"{key} \(did you mean {ours}\?\)"):
            load_train_config("tiny", [f"{key}=1"])


def test_divergence_before_any_checkpoint_says_to_start_again(corpus, tmp_path):
    trainer = Trainer(load_train_config(None, overrides(corpus, tmp_path)))
    assert "no checkpoint was written yet" in trainer.last_good()
    assert "start the run again (without --resume)" in trainer.last_good()


def test_resume_takes_a_path_only_when_one_follows():
    """``--resume`` stays a flag before an override or the config; a directory after it is the checkpoint."""
    from helmlm.cli import parse_args

    parse = lambda *argv: parse_args(["train", *argv])  # noqa: E731
    args = parse("tiny", "--resume", "train.steps=5", "--extend")
    assert args.resume and args.resume_from is None and args.extend
    assert args.config == "tiny" and args.overrides == ["train.steps=5"]
    args = parse("--resume", "tiny")
    assert args.resume and args.config == "tiny"
    args = parse("tiny", "--resume", "runs/x/checkpoints/step-00000004", "train.lr=1e-3")
    assert args.resume_from == "runs/x/checkpoints/step-00000004" and args.overrides == ["train.lr=1e-3"]
    assert parse("--resume=runs/x", "tiny").resume_from == "runs/x"


def test_init_from_an_exported_llama_twin(corpus, tmp_path):
    """The LLaMA-style twin exports as a standard LlamaForCausalLM directory; a new run starts from it with the
    twin's exact weights."""
    twin = ("model.preset=llama_tiny", "train.steps=2")
    train(load_train_config(None, overrides(corpus, tmp_path / "src", *twin)))
    source = load_file(latest_checkpoint(tmp_path / "src") / "model.safetensors")
    export_checkpoint(tmp_path / "src", tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "llama"
    trainer = Trainer(load_train_config(None, overrides(corpus, tmp_path / "a", *twin,
                                                        f"train.init_from={tmp_path / 'model'}")))
    assert weights_equal(dict(trainer.model.state_dict()), source)


def test_export_writes_a_model_card_with_the_hubs_metadata(run_and_model, corpus, tmp_path):
    """README.md: the Hub's YAML (library, pipeline, tags, license, parameters, tokens) and the run's numbers, read
    back through huggingface_hub; the HELM card says how to load with and without helmlm, a Llama card that no
    helmlm is needed."""
    import json
    import math

    from huggingface_hub import ModelCard

    from helmlm.models import HELMConfig
    from helmlm.models.params import count_parameters

    run, model_dir, _ = run_and_model
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    card = ModelCard.load(model_dir / "README.md")
    data = card.data.to_dict()
    params = count_parameters(HELMConfig.from_pretrained(model_dir))
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0" and {"helmlm", "hyperbolic", "custom_code"} <= set(data["tags"])
    assert (data["parameters_total"], data["parameters_active"]) == (params["total"], params["active"])
    assert data["training_tokens"] == state["tokens_seen"]
    loss = state["metrics"]["val_loss"]
    assert f"validation loss **{loss:.4f}** (perplexity {math.exp(loss):.2f}) at step 2" in card.text
    assert "HELM-D: a hyperbolic decoder" in card.text
    assert "trust_remote_code=True" in card.text and "import helmlm" in card.text
    twin = tmp_path / "twin"
    assert cli("train", *overrides(corpus, twin, "train.steps=1", "model.preset=llama_tiny")).returncode == 0
    export_checkpoint(twin, tmp_path / "llama", license="mit")
    llama = ModelCard.load(tmp_path / "llama" / "README.md")
    assert llama.data.license == "mit" and "llama" in llama.data.tags and "hyperbolic" not in llama.data.tags
    assert "no helmlm needed" in llama.text and "trust_remote_code" not in llama.text
