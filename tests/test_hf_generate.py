"""transformers' ``model.generate`` on HELM models (fp64, all four architectures): greedy equals our engine on a
left-padded batch, the KV cache (the HMLA latent cache included) changes nothing, beam search reorders the cache
correctly, EOS stops rows, seeded sampling repeats, and ``pipeline("text-generation")`` runs on a saved directory."""

from __future__ import annotations

import pytest
import torch

from helmlm.generation import SamplingSettings, generate
from helmlm.models import HELMForCausalLM, load_config
from helmlm.models.modeling import HELMCache

PRESETS = ["helm_d_tiny", "llama_tiny", "helm_mice_tiny", "deepseek_tiny"]
PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 30], [71]]
PAD = 0


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make(preset: str) -> HELMForCausalLM:
    torch.manual_seed(0)
    config = load_config(preset, vocab_size=97, num_hidden_layers=2, max_position_embeddings=64, moe_dispatch="dense")
    model = HELMForCausalLM(config).eval()
    assert model.dtype == torch.float64
    return model


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_generate(model, prompts, **kwargs) -> torch.Tensor:
    """The generated part (prompt columns dropped) of ``model.generate`` on the left-padded ``prompts``."""
    ids, mask = left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert torch.equal(sequences[:, : ids.shape[1]], ids.repeat_interleave(kwargs.get("num_return_sequences", 1), 0))
    return sequences[:, ids.shape[1]:]


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_equals_our_engine_on_a_left_padded_batch(preset):
    """Token for token; and each row's logits equal its prompt's decoded alone (no padding) by plain forwards,
    so padding that leaked into a row would show even where the argmax survived it."""
    model = make(preset)
    ours = generate(model, PROMPTS, SamplingSettings(max_new_tokens=10, temperature=0))
    ids, mask = left_padded(PROMPTS)
    out = model.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=10, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    theirs = out.sequences[:, ids.shape[1]:]
    assert theirs.tolist() == ours
    logits = torch.stack(out.logits, dim=1)  # (B, steps, V), fp32 as transformers keeps them
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt + ours[row]])).logits[0, len(prompt) - 1 : -1]
            torch.testing.assert_close(logits[row], alone.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_cache_changes_nothing_and_is_our_cache(preset):
    """With the cache (a HELMCache, the HMLA latent cache for mla) equals recomputing everything each step;
    the returned cache holds prompt + generated tokens but the last."""
    model = make(preset)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(*left_padded(PROMPTS)[:1], attention_mask=left_padded(PROMPTS)[1], pad_token_id=PAD,
                            use_cache=True, **kwargs)
    uncached = model.generate(*left_padded(PROMPTS)[:1], attention_mask=left_padded(PROMPTS)[1], pad_token_id=PAD,
                              use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=0, atol=1e-9)
    assert isinstance(cached.cache, HELMCache) and uncached.cache is None
    assert cached.cache.get_seq_length() == cached.sequences.shape[1] - 1
    tokens = cached.sequences.numel() - cached.sequences.shape[0]
    assert cached.cache.nbytes() == tokens * model.kv_bytes_per_token()  # for mla: the compact latent cache


@pytest.mark.parametrize("preset", PRESETS)
def test_beam_search_with_the_cache_equals_without(preset):
    """Beam search reorders the cache every step (``reorder_cache``); a wrong reorder changes the beams. Shape:
    (batch * num_return_sequences, prompt + new)."""
    model = make(preset)
    kwargs = dict(max_new_tokens=8, num_beams=4, num_return_sequences=3, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    ids, mask = left_padded(PROMPTS)
    cached = model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, pad_token_id=PAD, use_cache=False, **kwargs)
    assert cached.sequences.shape == (3 * len(PROMPTS), ids.shape[1] + 8)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=1e-6)


def test_beam_search_with_one_beam_is_greedy():
    model = make("helm_mice_tiny")
    greedy = hf_generate(model, PROMPTS, max_new_tokens=8, do_sample=False)
    assert torch.equal(hf_generate(model, PROMPTS, max_new_tokens=8, num_beams=1, do_sample=False), greedy)
    beams = hf_generate(model, PROMPTS, max_new_tokens=8, num_beams=2, do_sample=False)
    assert beams.shape == greedy.shape


@pytest.mark.parametrize("preset", ["helm_d_tiny", "deepseek_tiny"])
def test_eos_stops_rows(preset):
    """Rows end at EOS (kept), then get padding; the other rows continue as without EOS; decoding ends when the
    last row ends (row 0 meets EOS at its third token)."""
    model = make(preset)
    free = generate(model, PROMPTS, SamplingSettings(max_new_tokens=8, temperature=0))
    eos = free[0][2]
    out = hf_generate(model, PROMPTS, max_new_tokens=8, do_sample=False, eos_token_id=eos).tolist()
    for row, tokens in enumerate(out):
        end = free[row].index(eos) + 1 if eos in free[row] else 8
        assert tokens[:end] == free[row][:end] and set(tokens[end:]) <= {PAD}
    assert max(map(len, out)) == max(free[row].index(eos) + 1 if eos in free[row] else 8 for row in range(3))
    ours = generate(model, PROMPTS, SamplingSettings(max_new_tokens=8, temperature=0), eos_token_id=eos)
    assert [tokens[: len(mine)] for tokens, mine in zip(out, ours)] == ours


def test_seeded_sampling_repeats():
    model = make("helm_mice_tiny")

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return hf_generate(model, PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helmlm.data.tokenizer import train_bpe

    tokenizer = train_bpe(["the cat sat on the mat and the dog ran far away from the old house"] * 50,
                          vocab_size=300)
    torch.manual_seed(0)
    config = load_config("helm_mice_tiny", vocab_size=len(tokenizer), num_hidden_layers=1,
                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id, moe_dispatch="dense")
    path = tmp_path_factory.mktemp("model")
    HELMForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_pipeline_generates_text_from_a_saved_directory(model_dir):
    from transformers import pipeline

    import helmlm  # noqa: F401  (registers the Auto classes)

    torch.set_default_dtype(torch.float32)
    pipe = pipeline("text-generation", model=str(model_dir))
    assert isinstance(pipe.model, HELMForCausalLM)
    [result] = pipe("the cat", max_new_tokens=6, do_sample=False)
    assert result["generated_text"].startswith("the cat")
    tokenizer = pipe.tokenizer
    prompt = tokenizer("the cat", return_tensors="pt")
    expected = generate(pipe.model, [prompt.input_ids[0].tolist()], SamplingSettings(max_new_tokens=6, temperature=0),
                        eos_token_id=tokenizer.eos_token_id)[0]
    assert result["generated_text"] == tokenizer.decode(prompt.input_ids[0].tolist() + expected,
                                                        skip_special_tokens=True)
    batch = pipe(["the cat", "a dog ran far"], max_new_tokens=4, do_sample=False, batch_size=2)
    assert [r[0]["generated_text"][: len(p)] for r, p in zip(batch, ["the cat", "a dog ran far"])] == \
        ["the cat", "a dog ran far"]


def test_our_engine_on_a_transformers_llama_equals_its_generate():
    """``helmlm generate`` also runs Hugging Face models (e.g. an exported LLaMA twin): on a left-padded batch our
    loop gives the tokens of transformers' own greedy ``generate`` (a wrong decode-step mask or cache would not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ours = generate(model, PROMPTS, SamplingSettings(max_new_tokens=10, temperature=0))
    assert hf_generate(model, PROMPTS, max_new_tokens=10, do_sample=False, eos_token_id=None).tolist() == ours
