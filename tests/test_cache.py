"""Incremental decoding with a cache equals recomputation (fp64), for all four architectures, including batched
prompts of different lengths (left padding)."""

from __future__ import annotations

import pytest
import torch

from helmlm.models import HELMForCausalLM, InputError, load_config, output_cache
from helmlm.nn.cache import ModelCache

# the shipped tiny presets, and HELM's as the reference builds it (its table and HMLA initialisation)
PRESETS = ["helm_d_tiny", "llama_tiny", "helm_mice_tiny", "deepseek_tiny", "helm_d_tiny_reference",
           "helm_mice_tiny_reference"]


def make(preset: str) -> HELMForCausalLM:
    torch.manual_seed(0)
    config = load_config(preset, vocab_size=97, num_hidden_layers=2, max_position_embeddings=64,
                         moe_dispatch="dense")
    return HELMForCausalLM(config).double().eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_decoding_equals_recomputation(preset):
    """Prefill 7 tokens, then feed 9 more one at a time: every step's logits equal the full forward's (1e-10)."""
    model = make(preset)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        steps = [out.logits]
        cache = output_cache(out)
        for t in range(7, 16):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_decodes_like_each_prompt_alone(preset):
    """Prompts of lengths 5 and 9, left-padded to 9 (positions counted from each prompt's first real token), then 6
    cached decoding steps: each row's logits equal that prompt decoded alone without padding (1e-10)."""
    model = make(preset)
    prompts = [torch.randint(0, 97, (5,)), torch.randint(0, 97, (9,))]
    continuation = torch.randint(0, 97, (2, 6))
    width = 9
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits = [out.logits[:, -1:]]
        cache, next_pos = output_cache(out), positions[:, -1:] + 1
        for t in range(6):
            out = model(continuation[:, t : t + 1], past_key_values=cache, use_cache=True,
                        attention_mask=torch.ones(2, 1, dtype=torch.long), position_ids=next_pos)
            logits.append(out.logits)
            next_pos = next_pos + 1
        batched = torch.cat(logits, dim=1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]]).unsqueeze(0)).logits[0, len(prompt) - 1 :]
            torch.testing.assert_close(batched[row], alone, rtol=0, atol=1e-10)


def test_cache_length_is_checked_against_the_context_window():
    model = make("helm_d_tiny")
    cache = ModelCache(len(model.model.layers))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 60)), past_key_values=cache)
        with pytest.raises(InputError, match=r"sequence length 65 \(60 cached \+ 5 new\) exceeds"):
            model(torch.randint(0, 97, (1, 5)), past_key_values=cache)


@pytest.mark.parametrize("preset", PRESETS)
def test_measured_cache_memory_matches_kv_bytes_per_token(preset):
    model = make(preset)
    with torch.no_grad():
        cache = output_cache(model(torch.randint(0, 97, (3, 40)), use_cache=True))
    assert cache.nbytes() == 3 * 40 * model.kv_bytes_per_token()
    assert model.kv_bytes_per_token(torch.bfloat16) * 4 == model.kv_bytes_per_token(torch.float64)


def test_latent_cache_of_the_paper_presets_is_under_a_quarter_of_helm_d():
    """HELM-MiCE 120M caches (66 latent point + 16 rotary + 2 x 6 head times) x 6 layers = 564 numbers per token
    against HELM-D's 2 x 390 x 6 = 4,680 (same width): about an eighth."""
    helm_d = load_config("helm_d_paper").kv_cache_floats_per_token()
    mice = load_config("helm_mice_120m").kv_cache_floats_per_token()
    assert (helm_d, mice) == (4680, 564)
    assert mice * 4 <= helm_d


def test_model_cache_attention_mask_hides_cached_padding_but_never_a_query_itself():
    """Step masks over cached + new keys: causal, padding keys hidden, and every query sees its own key."""
    cache = ModelCache(1)
    first = cache.attention_mask(torch.tensor([[0, 1, 1]]))  # a left-padded prompt
    assert first.shape == (1, 1, 3, 3)
    assert first[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    step = cache.attention_mask(torch.tensor([[1]]))
    assert step.shape == (1, 1, 1, 4) and step[0, 0].tolist() == [[False, True, True, True]]
    assert cache.mask.tolist() == [[False, True, True, True]]


def padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_operations_equal_decoding_the_chosen_rows(preset):
    """After a left-padded prefill of 3 rows, ``reorder_cache([2, 0, 2])`` (beam search), ``batch_select_indices``,
    ``batch_repeat_interleave`` and ``crop`` leave a cache that decodes exactly like a fresh prefill of those rows
    (every buffer of the layer, the HMLA latent cache included, and the mask follow; 1e-10)."""
    model = make(preset)
    prompts = [torch.randint(0, 97, (n,)) for n in (4, 9, 6)]
    step = torch.randint(0, 97, (3, 1))

    def prefill(rows: list[int]):
        ids, mask, pos = padded([prompts[r] for r in rows])
        return output_cache(model(ids, attention_mask=mask, position_ids=pos, use_cache=True)), pos[:, -1:] + 1

    def decode(cache, rows: list[int], next_pos):
        return model(step[rows], past_key_values=cache, use_cache=True, position_ids=next_pos,
                     attention_mask=torch.ones(len(rows), 1, dtype=torch.long)).logits

    cases = {"reorder_cache": (torch.tensor([2, 0, 2]), [2, 0, 2]),
             "batch_select_indices": (torch.tensor([1, 2]), [1, 2]),
             "batch_repeat_interleave": (2, [0, 0, 1, 1, 2, 2])}
    with torch.no_grad():
        for op, (arg, rows) in cases.items():
            cache, next_pos = prefill([0, 1, 2])
            getattr(cache, op)(arg)
            expected_cache, expected_pos = prefill(rows)
            assert torch.equal(next_pos[torch.tensor([[0, 1, 2][r] for r in rows])], expected_pos)
            torch.testing.assert_close(decode(cache, rows, expected_pos), decode(expected_cache, rows, expected_pos),
                                       rtol=0, atol=1e-10, msg=op)
        cache, next_pos = prefill([0, 1, 2])
        decode(cache, [0, 1, 2], next_pos)
        cache.crop(-1)  # forget the step: decoding it again gives the same logits
        assert cache.get_seq_length() == 9 and cache.mask.shape == (3, 9)
        fresh, _ = prefill([0, 1, 2])
        torch.testing.assert_close(decode(cache, [0, 1, 2], next_pos), decode(fresh, [0, 1, 2], next_pos),
                                   rtol=0, atol=1e-10)


def test_the_model_cache_is_a_transformers_cache():
    """What a forward with ``use_cache=True`` returns is a ``transformers.Cache`` (``HELMCache``) with the
    properties ``GenerationMixin`` reads; an empty foreign cache is replaced, a filled one is refused."""
    from transformers import Cache, DynamicCache

    from helmlm.models.modeling import HELMCache

    model = make("helm_mice_tiny")
    with torch.no_grad():
        cache = output_cache(model(torch.randint(0, 97, (2, 5)), use_cache=True))
        assert isinstance(cache, HELMCache) and isinstance(cache, Cache) and isinstance(cache, ModelCache)
        assert (cache.get_seq_length(), len(cache), cache.is_compileable, cache.is_croppable) == (5, 2, False, True)
        assert cache.is_linear == [False, False] and cache.get_mask_sizes(1, 0) == (6, 0)
        replaced = output_cache(model(torch.randint(0, 97, (2, 5)), past_key_values=DynamicCache(), use_cache=True))
        assert isinstance(replaced, HELMCache) and replaced.get_seq_length() == 5
        filled = DynamicCache()
        filled.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
        with pytest.raises(InputError, match="DynamicCache cannot be used as a HELM KV cache"):
            model(torch.randint(0, 97, (2, 1)), past_key_values=filled, use_cache=True)
