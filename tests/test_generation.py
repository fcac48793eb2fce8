"""generate(): greedy equals recomputed argmax, batches with left padding equal each prompt alone, sampling is
seeded, filters behave, bad requests fail clearly."""

from __future__ import annotations

import pytest
import torch

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
