"""``helmlm finetune`` / ``finetune-eval`` / ``word-problems``: the instruction data, the training loop (LoRA and
HypLoRA, response-only loss, exact resume), answer scoring, cached generation, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

from conftest import save_tiny_llama  # noqa: E402

from helmlm.cli import main  # noqa: E402
from helmlm.data.arithmetic import word_problems, write_word_problems  # noqa: E402
from helmlm.data.instructions import IGNORE_INDEX, Instruction, encode, prompt_text, read_instructions  # noqa: E402
from helmlm.eval.answers import first_label, generate_answers, last_number, math_correct, score  # noqa: E402
from helmlm.training import finetune as ft  # noqa: E402


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    out = tmp_path_factory.mktemp("problems")
    write_word_problems(out, train=12, test=6, seed=3, val=5)
    return out


@pytest.fixture(scope="module")
def base_dir(problems, tmp_path_factory):
    """A tiny random transformers Llama with a BPE trained on the problems (no chat template: the plain frame)."""
    from helmlm.data.tokenizer import train_bpe

    texts = [e.instruction + "\n" + e.output for e in read_instructions(problems / "train.jsonl")]
    tokenizer = train_bpe(texts * 30 + ["### Instruction:\n### Response:\n"] * 30, vocab_size=300)
    return save_tiny_llama(tokenizer, tmp_path_factory.mktemp("base") / "model")


def settings(base_dir, problems, out, **kw) -> ft.FinetuneSettings:
    fields = dict(base_dir=str(base_dir), data=str(problems / "train.jsonl"), out_dir=str(out), rank=4, alpha=8,
                  epochs=2, batch_size=4, max_length=96, eval_data=str(problems / "test.jsonl"), eval_every=2,
                  save_every=2, lr=5e-3, dropout=0.1)
    fields.update(kw)
    return ft.FinetuneSettings(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def test_word_problems_are_seeded_distinct_and_right():
    a, b = word_problems(50, seed=1), word_problems(50, seed=1)
    assert a == b and word_problems(50, seed=2) != a
    assert len({p.instruction for p in a}) == 50
    for p in a:
        for left, right in re.findall(r"^(.*) = (-?\d+)\.$", p.output, flags=re.M):
            assert eval(left.replace("/", "//")) == int(right)  # noqa: S307 (our own digits and operators)
        assert p.output.endswith(f"The answer is {p.answer}.") and int(right) == int(p.answer)


def test_train_and_test_problems_never_overlap(problems):
    train, test, val = ({e.instruction for e in read_instructions(problems / f"{split}.jsonl")}
                        for split in ("train", "test", "val"))
    assert (len(train), len(test), len(val)) == (12, 6, 5) and not train & test and not val & (train | test)
    with pytest.raises(Exception, match="already holds"):
        write_word_problems(problems, 2, 2)


def test_loss_covers_the_response_and_eos_only(base_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    example = Instruction("What is 2 + 3?", "2 + 3 = 5.\nThe answer is 5.", input="be brief")
    encoded = encode(tokenizer, example, max_length=500)
    prompt = prompt_text(tokenizer, example)
    assert prompt == "### Instruction:\nWhat is 2 + 3?\n\n### Input:\nbe brief\n\n### Response:\n"
    under_loss = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert under_loss == tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encode(tokenizer, example, 500, train_on_inputs=True)["labels"] == encoded["input_ids"]
    assert len(encode(tokenizer, example, 7)["input_ids"]) == 7


def test_answer_scoring():
    assert last_number("so 1,234 apples, then 17.5 more") == 17.5 and last_number("none") is None
    assert math_correct("The answer is 42.", "42") and math_correct("-3.0004", "-3")
    assert not math_correct("The answer is 41.", "42") and not math_correct("no idea", "42")
    assert first_label("I think Option2, not option1", ["option1", "option2"]) == "option2"
    assert score(["true", "it is False", "maybe"], ["true", "true", "false"], "choice") == [True, False, False]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "hyplora"])
def test_finetune_trains_an_adapter_that_reloads(base_dir, problems, tmp_path, method):
    from helmlm.peft import is_hyplora_dir, load_adapter, load_base_model

    summary = ft.finetune(settings(base_dir, problems, tmp_path / "run", method=method, epochs=4), log=lambda m: None,
                          progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))  # 4 epochs of 3 batches
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 6 and evals[-1] < evals[0]
    adapter = tmp_path / "run" / "adapter"
    assert is_hyplora_dir(adapter) == (method == "hyplora") and summary["adapter"] == str(adapter)
    model, tokenizer = load_base_model(base_dir)
    reloaded = load_adapter(model, adapter)
    ids = torch.tensor([tokenizer("How many apples?")["input_ids"]])
    trained, _ = load_base_model(base_dir)
    assert not torch.equal(reloaded(ids).logits, trained(ids).logits)  # the adapter changes the model


def test_a_killed_run_resumes_to_the_same_adapter(base_dir, problems, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    ft.finetune(settings(base_dir, problems, tmp_path / "whole"), log=lambda m: None, progress=False)
    real_step = ft._train_step

    def dies_after_step_3(run, s):
        if run.step == 3:
            raise KeyboardInterrupt
        return real_step(run, s)

    monkeypatch.setattr(ft, "_train_step", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(settings(base_dir, problems, tmp_path / "pieces"), log=lambda m: None, progress=False)
    monkeypatch.setattr(ft, "_train_step", real_step)
    with pytest.raises(Exception, match="exists and is not empty"):
        ft.finetune(settings(base_dir, problems, tmp_path / "pieces"), log=lambda m: None, progress=False)
    with pytest.raises(Exception, match="other settings .*lr"):
        ft.finetune(settings(base_dir, problems, tmp_path / "pieces", lr=1e-3), resume=True, log=lambda m: None)
    ft.finetune(settings(base_dir, problems, tmp_path / "pieces"), resume=True, log=lambda m: None, progress=False)
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    pieces = load_file(tmp_path / "pieces" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == pieces.keys() and all(torch.equal(whole[k], pieces[k]) for k in whole)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "pieces" / "metrics.jsonl").read_text()


def test_finetune_eval_generates_through_the_cache_and_scores(base_dir, problems, tmp_path):
    from helmlm.eval.answers import evaluate_answers
    from helmlm.peft import load_base_model

    ft.finetune(settings(base_dir, problems, tmp_path / "run", epochs=1), log=lambda m: None, progress=False)
    preds = tmp_path / "preds.jsonl"
    result = evaluate_answers(base_dir, problems / "test.jsonl", adapter_dir=tmp_path / "run" / "adapter",
                              max_new_tokens=6, batch_size=4, predictions_path=preds, progress=False)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert result["n"] == len(rows) == 6 and result["correct"] == sum(r["correct"] for r in rows)
    # batched, left-padded, cached greedy decoding = one prompt at a time without a cache
    model, tokenizer = load_base_model(base_dir)
    examples = read_instructions(problems / "test.jsonl")[:3]
    batched = generate_answers(model, tokenizer, examples, max_new_tokens=6, batch_size=3, progress=False)
    for example, text in zip(examples, batched):
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        ids = torch.tensor([bos + tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]])
        alone = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False,
                               pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        assert text == tokenizer.decode(alone, skip_special_tokens=True)


def test_bad_input_exits_2_and_writes_nothing(base_dir, problems, tmp_path, capsys):
    def run(*argv, data=problems / "train.jsonl", base=base_dir):
        out = tmp_path / "out"
        code = main(["finetune", str(base), "--data", str(data), "--out", str(out), *argv])
        assert code == 2 and not out.exists()
        return capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    assert f"{bad}:2: missing or empty string field 'output'" in run(data=bad)
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    assert f"{bad}:2: not valid JSON" in run(data=bad)
    err = run("--target-modules", "q_proj,attn_out")
    assert "attn_out not in the model; its linear modules are: down_proj, gate_proj, k_proj, o_proj" in err
    assert "rank must be a positive integer, got 0" in run("--rank", "0")
    assert "base model directory not found" in run(base=tmp_path / "nowhere")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert "is a GGUF file; convert it" in run(base=gguf)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    assert "found pytorch_model.bin: pickled or GGUF weights, which helmlm does not read" in run(base=pickled)
    assert main(["finetune-eval", str(base_dir), "--data", str(problems / "test.jsonl"), "--limit", "0"]) == 2
    assert "--limit must be a positive number" in capsys.readouterr().err
