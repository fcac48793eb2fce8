"""generate(): greedy equals recomputed argmax, batches with left padding equal each prompt alone, sampling is
seeded, filters behave, bad requests fail clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama

from helmlm.generation import GenerationError, SamplingSettings, generate, next_token_scores
from helmlm.models import HELMForCausalLM, load_config


def make(preset: str) -> HELMForCausalLM:
    torch.manual_seed(0)
    config = load_config(preset, vocab_size=97, num_hidden_layers=2, max_position_embeddings=64, moe_dispatch="dense")
    return HELMForCausalLM(config).double().eval()


def greedy_by_recomputation(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("preset", ["helm_d_tiny", "llama_tiny", "helm_mice_tiny", "deepseek_tiny"])
def test_greedy_batch_equals_recomputation_per_prompt(preset):
    model = make(preset)
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 30], [71]]
    out = generate(model, prompts, SamplingSettings(max_new_tokens=8, temperature=0))
    assert out == [greedy_by_recomputation(model, p, 8) for p in prompts]


def test_eos_stops_a_row_and_streaming_reports_each_step():
    model = make("helm_d_tiny")
    free = generate(model, [[5, 17, 3]], SamplingSettings(max_new_tokens=6, temperature=0))[0]
    eos = free[2]
    seen = []
    out = generate(model, [[5, 17, 3], [4, 4]], SamplingSettings(max_new_tokens=6, temperature=0), eos_token_id=eos,
                   streamer=seen.append)
    assert out[0] == free[: free.index(eos) + 1]
    assert [step[0] for step in seen if step[0] is not None] == out[0]
    assert [step[1] for step in seen if step[1] is not None] == out[1]


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    model = make("llama_tiny")
    s = SamplingSettings(max_new_tokens=10, temperature=1.3, seed=7)
    assert generate(model, [[1, 2, 3]], s) == generate(model, [[1, 2, 3]], s)
    assert generate(model, [[1, 2, 3]], s) != generate(model, [[1, 2, 3]], SamplingSettings(10, 1.3, seed=8))
    greedy = generate(model, [[1, 2, 3]], SamplingSettings(max_new_tokens=10, temperature=0))
    assert generate(model, [[1, 2, 3]], SamplingSettings(max_new_tokens=10, temperature=0.7, top_k=1, seed=3)) == greedy


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    history, mask = torch.tensor([[0, 4]]), torch.ones(1, 2)
    top_k = next_token_scores(logits, history, mask, SamplingSettings(top_k=2))
    assert torch.isfinite(top_k).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    top_p = next_token_scores(logits, history, mask, SamplingSettings(top_p=0.8))
    assert torch.isfinite(top_p).tolist() == [[True, True, False, False, False]] and probs[:2].sum() > 0.8
    penalised = next_token_scores(logits, history, mask, SamplingSettings(repetition_penalty=2.0, temperature=0))
    assert penalised.tolist() == [[1.5, 2.0, 1.0, 0.0, -2.0]]


@pytest.mark.parametrize("settings, prompts, message", [
    (SamplingSettings(temperature=-0.1), [[1]], "temperature must be >= 0"),
    (SamplingSettings(top_p=0.0), [[1]], r"top_p must be in \(0, 1\]"),
    (SamplingSettings(top_p=1.5), [[1]], r"top_p must be in \(0, 1\]"),
    (SamplingSettings(), [[]], "empty prompt"),
    (SamplingSettings(max_new_tokens=10), [list(range(60))], "prompt of 60 tokens .* context window of 64"),
])
def test_bad_requests_fail_clearly(settings, prompts, message):
    with pytest.raises(GenerationError, match=message):
        generate(make("helm_d_tiny"), prompts, settings)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny HELM-D with a BPE tokenizer (what `helmlm export` writes)."""
    from helmlm.data.tokenizer import train_bpe

    words = "the of and to in a is that it was for on are as with his they at be this from have or by one".split()
    rng = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=rng)) for _ in range(200)]
    tokenizer = train_bpe(texts, vocab_size=300)
    torch.manual_seed(0)
    config = load_config("helm_d_tiny", vocab_size=len(tokenizer), num_hidden_layers=1, max_position_embeddings=32,
                         eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("model")
    HELMForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_cli(*args, stdin: str | None = None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "helmlm", "generate", *args], capture_output=True, text=True,
                          input=stdin)


def test_cli_streams_the_greedy_continuation(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer("the one", add_special_tokens=False).input_ids
    expected = generate(model, [ids], SamplingSettings(max_new_tokens=6, temperature=0),
                        eos_token_id=tokenizer.eos_token_id)[0]
    text = "the one" + tokenizer.decode([t for t in expected if t != tokenizer.eos_token_id])
    result = run_cli(str(model_dir), "--prompt", "the one", "--max-new-tokens", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    from_stdin = run_cli(str(model_dir), "--max-new-tokens", "6", "--temperature", "0", stdin="the one\n\nthe one\n")
    assert from_stdin.stdout == 2 * (text + "\n")


def test_cli_compiled_decoding_prints_the_eager_text(model_dir, tmp_path):
    """``--compile``: the same greedy text as eager decoding; a model that is not helmlm's is refused up front."""
    from transformers import AutoTokenizer

    args = (str(model_dir), "--prompt", "the one", "--max-new-tokens", "6", "--temperature", "0")
    eager, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout
    llama = save_tiny_llama(AutoTokenizer.from_pretrained(model_dir), tmp_path / "llama")
    refused = run_cli(str(llama), "--prompt", "the one", "--compile")
    assert refused.returncode == 2 and "--compile needs a helmlm model" in refused.stderr
    assert refused.stdout == ""


@pytest.mark.parametrize("args, stdin, message", [
    (["--prompt", "x", "--top-p", "1.5"], None, "top_p must be in (0, 1]"),
    (["--prompt", "x", "--temperature", "-1"], None, "temperature must be >= 0"),
    (["--prompt", "the " * 40, "--max-new-tokens", "4"], None, "exceeds the context window of 32 tokens"),
    ([], "  \n", "no prompts"),
])
def test_cli_rejects_bad_requests(model_dir, args, stdin, message):
    result = run_cli(str(model_dir), *args, stdin=stdin)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_model_directory(tmp_path):
    result = run_cli(str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == 2 and "not a model directory" in result.stderr


def test_stop_callback_ends_a_row_and_the_cli_cuts_at_a_stop_string(model_dir):
    model = make("helm_d_tiny")
    free = generate(model, [[5, 17, 3]], SamplingSettings(max_new_tokens=8, temperature=0))[0]
    stopped = generate(model, [[5, 17, 3]], SamplingSettings(max_new_tokens=8, temperature=0),
                       stop=lambda row, ids: len(ids) >= 3 and ids[-1] == free[2])
    assert stopped[0] == free[:3]
    full = run_cli(str(model_dir), "--prompt", "the one", "--max-new-tokens", "8", "--temperature", "0").stdout
    continuation = full[len("the one"):].rstrip("\n")
    stop = continuation.strip()[:3]
    assert stop, "the continuation is empty; the test needs some text to stop on"
    cut = run_cli(str(model_dir), "--prompt", "the one", "--max-new-tokens", "8", "--temperature", "0",
                  "--stop", stop)
    assert cut.returncode == 0 and cut.stdout == "the one" + continuation[: continuation.find(stop)] + "\n"


def test_cli_model_directory_without_a_tokenizer(tmp_path):
    HELMForCausalLM(load_config("helm_d_tiny", vocab_size=97, num_hidden_layers=1)).save_pretrained(tmp_path)
    result = run_cli(str(tmp_path), "--prompt", "x")
    assert result.returncode == 2 and "no tokenizer" in result.stderr and "Traceback" not in result.stderr
