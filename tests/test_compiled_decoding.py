"""Compiled decoding (issue 16): a static cache and a step that ``torch.compile`` takes whole compute what the
ordinary cached forward computes, for all four architectures, left-padded batches included."""

from __future__ import annotations

import pytest
import torch
from test_performance import tiny

from helmlm.generation import MIN_STATIC_CAPACITY, SamplingSettings, generate, static_capacity
from helmlm.models import output_cache
from helmlm.nn.cache import StaticModelCache

KINDS = ["helm_d", "llama", "helm_mice", "deepseek"]


def padded_prompts():
    """Two prompts of 7 and 4 tokens, left-padded: ``(ids, attention_mask, position_ids)``."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("kind", KINDS)
def test_static_step_equals_the_cached_forward(kind):
    """fp64: after the same prefill, ``static_step`` over the static cache (every key of its capacity, unwritten
    ones masked) gives the logits of ``forward`` over the growing cache, step after step."""
    model = tiny(kind).eval()
    ids, mask, positions = padded_prompts()
    g = torch.Generator().manual_seed(3)
    new = torch.randint(0, 97, (2, 5), generator=g)
    with torch.no_grad():
        prefill = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        growing = output_cache(model(**prefill))
        static = StaticModelCache.from_cache(output_cache(model(**prefill)), capacity=20)
        history = mask
        for t in range(new.shape[1]):
            token, pos = new[:, t : t + 1], positions[:, -1:] + 1 + t
            history = torch.cat([history, torch.ones_like(token)], dim=1)
            want = model(token, attention_mask=history, position_ids=pos, past_key_values=growing,
                         use_cache=True).logits[:, -1]
            static.check_room(1)
            got = model.static_step(token, pos, static)
            static.advance(1)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert static.length == growing.length == 12
    assert static.nbytes() == growing.nbytes()


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_decoding_gives_the_eager_tokens(kind):
    """``generate(compile=True)`` (inductor; fp32, a left-padded batch): the greedy tokens of the eager loop; the
    compiled step's logits agree with the eager step's to fp32 rounding, and dynamo traces the step as one graph."""
    torch._dynamo.reset()
    model = tiny(kind).float().eval()
    ids, mask, positions = padded_prompts()
    prompts = [ids[0].tolist(), ids[1, 3:].tolist()]
    settings = SamplingSettings(max_new_tokens=10, temperature=0)
    assert generate(model, prompts, settings, compile=True) == generate(model, prompts, settings)

    with torch.no_grad():  # the compiled step itself, against the eager one, from the same cache
        prefill = output_cache(model(ids, attention_mask=mask, position_ids=positions, use_cache=True))
        token, pos = ids[:, -1:], positions[:, -1:] + 1
        caches = [StaticModelCache.from_cache(prefill, capacity=static_capacity(17, 64)) for _ in range(3)]
        want = model.static_step(token, pos, caches[0])
        got = model._compiled_static_step(token, pos, caches[1])
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.static_step)(token, pos, caches[2])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_static_cache_capacity_and_bounds():
    model = tiny("helm_d").eval()
    ids, mask, positions = padded_prompts()
    with torch.no_grad():
        cache = output_cache(model(ids, attention_mask=mask, position_ids=positions, use_cache=True))
    with pytest.raises(ValueError, match="capacity 6 is smaller than the 7 tokens"):
        StaticModelCache.from_cache(cache, 6)
    with pytest.raises(ValueError, match="prefill"):
        StaticModelCache.from_cache(model.new_cache(), 8)
    static = StaticModelCache.from_cache(cache, 8)
    static.check_room(1)
    static.advance(1)
    with pytest.raises(ValueError, match="holds 8 tokens; 9 do not fit"):
        static.check_room(1)
    # a power of two from MIN_STATIC_CAPACITY, capped at the context window, never below what is needed
    for needed, limit in [(1, 4096), (256, 4096), (257, 4096), (3000, 4096), (300, 300), (300, 280), (5000, 4096)]:
        capacity = static_capacity(needed, limit)
        assert capacity >= needed
        assert capacity == needed or capacity == limit or (capacity >= MIN_STATIC_CAPACITY and
                                                           capacity & (capacity - 1) == 0 and capacity < 2 * max(
                                                               needed, MIN_STATIC_CAPACITY))


def test_compiled_decoding_needs_a_helmlm_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from helmlm.generation import GenerationError

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=64))
    with pytest.raises(GenerationError, match="compiled decoding needs a helmlm model"):
        generate(model, [[1, 2]], SamplingSettings(max_new_tokens=2, temperature=0), compile=True)
