"""``helmlm eval`` / :mod:`helmlm.eval.harness`: the same scores as lm-eval's ``--model hf``, ``generate_until``
semantics, the local and paper task definitions, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import save_tiny_llama  # noqa: E402

from helmlm.cli import main  # noqa: E402
from helmlm.eval.harness import TASKS_DIR, evaluate, task_manager  # noqa: E402
from helmlm.eval.tasks.utils import read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from helmlm.data.tokenizer import train_bpe

    texts = [line for f in sorted((TASKS_DIR / "data").glob("*.jsonl")) for line in f.read_text().splitlines()]
    return train_bpe(texts * 20, vocab_size=400)


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory):
    """A tiny random transformers Llama (not a helmlm model) with the tokenizer."""
    return save_tiny_llama(tokenizer, tmp_path_factory.mktemp("llama") / "model")


def metrics_of(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if isinstance(v, float)}


def test_scores_equal_lm_evals_own_hf_model(llama_dir):
    """On a Hugging Face directory, every metric of the multiple-choice and rolling-perplexity tasks equals what
    lm-eval's ``--model hf`` computes, exactly."""
    import lm_eval

    ours = evaluate(llama_dir, ["helm_local_mc", "helm_local_ppl"], limit=8, batch_size=4)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={llama_dir},device=cpu",
                                     tasks=["helm_local_mc", "helm_local_ppl"], limit=8, batch_size=4,
                                     task_manager=task_manager())
    for task in ("helm_local_mc", "helm_local_ppl"):
        assert metrics_of(ours, task) == metrics_of(theirs, task)
    assert {"acc,none", "acc_norm,none"} <= set(metrics_of(ours, "helm_local_mc"))
    assert metrics_of(ours, "helm_local_ppl")["bits_per_byte,none"] > 0


def test_generate_until_honours_until_and_max_gen_toks(llama_dir):
    """Greedy continuations: cut before the first ``until`` string, and no longer than ``max_gen_toks`` tokens."""
    from lm_eval.api.instance import Instance

    from helmlm.eval.harness import _register

    _register()
    from helmlm.eval import harness

    lm = harness.HelmLM(pretrained=str(llama_dir), batch_size=2)

    def run(*requests):
        return lm.generate_until([Instance("generate_until", {}, (ctx, kw), i) for i, (ctx, kw) in enumerate(requests)])

    ctx = "Question: What do bees make?"
    ids = lm.tok_encode(ctx)
    new = lm.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id)[0, len(ids):].tolist()
    free = run((ctx, {"until": ["<none>"], "max_gen_toks": 16, "do_sample": False}))[0]
    assert free == lm.tok_decode(new)  # no stop string: all 16 greedy tokens
    start = next(i for i in range(3, len(free) - 1) if free[i:i + 2].isascii() and free[i:i + 2].isalnum())
    stop = free[start:start + 2]
    cut, short = run((ctx, {"until": [stop], "max_gen_toks": 16, "do_sample": False}),
                     (ctx, {"until": ["<none>"], "max_gen_toks": 3, "do_sample": False}))
    assert cut == free[: free.index(stop)]
    assert short == lm.tok_decode(new[:3])


def test_local_and_paper_tasks_are_defined():
    manager = task_manager()
    assert {"helm_local", "helm_local_mc", "helm_local_gen", "helm_local_ppl", "helm_paper"} <= set(manager.all_tasks)
    from lm_eval.tasks._yaml_loader import load_yaml

    paper = load_yaml(TASKS_DIR / "helm_paper.yaml", resolve_func=False)
    shots = {t["task"]: t["num_fewshot"] for t in paper["task"]}
    # the paper's table: CSQA, HellaSwag, OBQA 0-shot; MMLU, ARC-Challenge 5-shot (REFERENCE-HELM.md)
    assert shots == {"commonsense_qa": 0, "hellaswag": 0, "openbookqa": 0, "mmlu": 5, "arc_challenge": 5}
    assert set(shots) <= set(manager.all_tasks)
    for data in (TASKS_DIR / "data").glob("*.jsonl"):
        assert read_jsonl(data)


def test_bad_inputs_exit_2_and_write_nothing(llama_dir, tmp_path, capsys):
    (tmp_path / "tasks").mkdir()
    bad_data = tmp_path / "tasks" / "bad.jsonl"
    bad_data.write_text('{"question": "a", "answer": "b"}\n{"question": oops}\n')
    (tmp_path / "tasks" / "bad_task.yaml").write_text(
        f"task: my_bad_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {bad_data}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: exact_match\n")
    existing = tmp_path / "out.json"
    existing.write_text("keep me")
    cases = [
        ([str(llama_dir), "--tasks", "helm_local_mcq"], "unknown task 'helm_local_mcq'; did you mean helm_local_mc"),
        ([str(tmp_path / "missing"), "--tasks", "helm_local_mc"], "not a model directory"),
        ([str(llama_dir), "--tasks", "my_bad_task", "--include-path", str(tmp_path / "tasks")],
         f"{bad_data}:2: not valid JSON"),
        ([str(llama_dir), "--tasks", "helm_local_mc", "--limit", "0"], "limit must be > 0"),
        ([str(llama_dir), "--tasks", "helm_local_mc", "--output-path", str(existing)], "pass --overwrite"),
        ([str(llama_dir)], "give a model directory and --tasks"),
    ]
    fresh = tmp_path / "new.json"
    for argv, phrase in cases:
        extra = [] if "--output-path" in argv else ["--output-path", str(fresh)]
        assert main(["eval", *argv, *extra]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and phrase in err, (argv, err)
        assert not fresh.exists(), argv
    assert existing.read_text() == "keep me"


def test_command_line_writes_results(llama_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(llama_dir), "--tasks", "helm_local_mc", "--limit", "4", "--output-path", str(out),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert printed["helm_local_mc"]["acc,none"] == saved["results"]["helm_local_mc"]["acc,none"]


LM_EVAL_WITHOUT_HELMLM = """
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("helmlm", "geoopt"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

sys.meta_path.insert(0, Blocked())
import lm_eval
from lm_eval.tasks import TaskManager

model_dir, tasks_dir = sys.argv[1], sys.argv[2]
results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},device=cpu,trust_remote_code=True",
                                  tasks=["helm_local_mc"], limit=6, batch_size=3,
                                  task_manager=TaskManager(include_path=tasks_dir))
print(json.dumps({k: v for k, v in results["results"]["helm_local_mc"].items() if isinstance(v, float)}))
"""


@pytest.mark.parametrize("preset", ["helm_d_tiny", "helm_mice_tiny"])
def test_helm_scores_equal_lm_evals_hf_model_with_remote_code(preset, tokenizer, tmp_path):
    """An exported HELM directory: ``helmlm eval`` here, and lm-eval's ``--model hf`` with ``trust_remote_code=True``
    in an interpreter where neither helmlm nor geoopt can be imported (the directory's generated remote code), give
    the same multiple-choice metrics."""
    import os
    import subprocess
    import sys

    from helmlm.models import HELMForCausalLM, load_config
    from helmlm.models.hf import save_model_dir

    torch.manual_seed(0)
    model = HELMForCausalLM(load_config(preset, vocab_size=len(tokenizer), num_hidden_layers=2))
    path = save_model_dir(model, tokenizer, tmp_path / "model")
    ours = evaluate(path, ["helm_local_mc"], limit=6, batch_size=3)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LM_EVAL_WITHOUT_HELMLM, str(path), str(TASKS_DIR)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics_of(ours, "helm_local_mc") == theirs


@pytest.mark.parametrize("preset", ["helm_d_tiny", "helm_mice_tiny"])
def test_generate_until_on_helm_models_equals_our_completion(preset, tokenizer, tmp_path):
    """``generate_until`` on an exported HELM model (``model.generate`` over the HELM cache, the HMLA latent cache for
    MiCE; a batch of two prompts of different lengths, so left-padded) gives the text of ``helmlm generate``'s greedy
    completion with the same stop strings, and ``max_gen_toks`` bounds it."""
    from lm_eval.api.instance import Instance

    from helmlm.eval import harness
    from helmlm.generation import SamplingSettings, complete, generate
    from helmlm.models import HELMForCausalLM, load_config
    from helmlm.models.hf import save_model_dir

    harness._register()
    torch.manual_seed(0)
    config = load_config(preset, vocab_size=len(tokenizer), num_hidden_layers=2, eos_token_id=tokenizer.eos_token_id)
    path = save_model_dir(HELMForCausalLM(config), tokenizer, tmp_path / "model")
    lm = harness.HelmLM(pretrained=str(path), batch_size=2, device="cpu")
    contexts = ["Question: What do bees make?\nAnswer:", "Q: Sky?"]
    for until, max_gen_toks in ([["\n\n"], 12], [["e"], 12], [["<none>"], 4]):
        kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
        got = lm.generate_until([Instance("generate_until", {}, (ctx, dict(kwargs)), i)
                                 for i, ctx in enumerate(contexts)])
        want = [complete(lm.model, lm.tokenizer, lm.tok_encode(ctx),
                         SamplingSettings(max_new_tokens=max_gen_toks, temperature=0), stop=until) for ctx in contexts]
        assert got == want, (until, max_gen_toks)
    free = generate(lm.model, [lm.tok_encode(ctx) for ctx in contexts], SamplingSettings(max_new_tokens=12,
                                                                                         temperature=0))
    assert max(map(len, free)) == 12 and got == [lm.tok_decode(ids[:4]) for ids in free]  # the last: 4 tokens


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_local_tasks_score_a_perfect_model_1_and_a_wrong_one_0(llama_dir, monkeypatch, num_fewshot):
    """The task definitions score what they should: a model whose continuations are the answers (as a real model
    writes them: a leading space, then a period and more text) gets exact_match 1 and acc/acc_norm 1; one that is
    always wrong gets 0. Catches a target that can never match (e.g. a stray space) or a wrong answer index."""
    from helmlm.eval import harness

    harness._register()

    def answers(right: bool):
        def generate_until(self, requests, disable_tqdm=False):
            texts = [f" {r.doc['answer'] if right else 'zebra'}.\nQuestion: more" for r in requests]
            for i, r in enumerate(requests):  # cut before the task's stop strings, as the model class does
                for stop in r.args[1]["until"]:
                    texts[i] = texts[i].split(stop)[0]
            return texts

        def loglikelihood(self, requests, disable_tqdm=False):
            def score(r):
                correct = r.args[1].strip() == r.doc["choices"][r.doc["answer"]]
                return (0.0 if correct == right else -10.0 - len(r.args[1]), True)
            return [score(r) for r in requests]
        return generate_until, loglikelihood

    for right in (True, False):
        generate_until, loglikelihood = answers(right)
        monkeypatch.setattr(harness.HelmLM, "generate_until", generate_until)
        monkeypatch.setattr(harness.HelmLM, "loglikelihood", loglikelihood)
        results = evaluate(llama_dir, ["helm_local_mc", "helm_local_gen"], num_fewshot=num_fewshot)["results"]
        expected = 1.0 if right else 0.0
        assert results["helm_local_gen"]["exact_match,strip"] == expected
        assert results["helm_local_mc"]["acc,none"] == results["helm_local_mc"]["acc_norm,none"] == expected
        assert results["helm_local_mc"]["sample_len"] == 64 and results["helm_local_gen"]["sample_len"] == 30
