"""``helmlm.eval.perplexity``: against a direct full-sequence computation, a hand-computed sliding-window case, bits
per byte, the window plan as a property, and the command line."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helmlm.cli import main
from helmlm.data.tokenizer import train_bpe
from helmlm.eval import perplexity
from helmlm.eval.perplexity import windows
from helmlm.models import HELMForCausalLM, load_config
from helmlm.models.hf import save_model_dir

TEXTS = ["the cat sat on the mat and the dog sat on the log", "a short one",
         "we hold these truths to be self-evident, that all men are created equal, " * 3]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([t for t in TEXTS for _ in range(20)], vocab_size=300)


def direct_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """The summed loss of a document in one forward: its tokens after the EOS prefix, nothing batched or windowed."""
    ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]])
    logits = model(ids).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item(), ids.shape[1] - 1


@pytest.mark.parametrize("preset", ["helm_d_tiny", "helm_mice_tiny", "llama_tiny"])
def test_equals_a_direct_computation_when_documents_fit(preset, tokenizer):
    """Batched (right padding, batch 2 over 3 documents of different lengths) equals one forward per document."""
    torch.manual_seed(0)
    model = HELMForCausalLM(load_config(preset, vocab_size=len(tokenizer), num_hidden_layers=2)).eval()
    result = perplexity(model, tokenizer, TEXTS, context_length=128, batch_size=2)
    sums = [direct_nll(model, tokenizer, t) for t in TEXTS]
    total, n = sum(s for s, _ in sums), sum(k for _, k in sums)
    assert result["tokens"] == n and result["documents"] == 3
    assert result["loss"] == pytest.approx(total / n, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_any_transformers_causal_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64))
    result = perplexity(model, tokenizer, TEXTS[:2], batch_size=2)
    sums = [direct_nll(model, tokenizer, t) for t in TEXTS[:2]]
    assert result["loss"] == pytest.approx(sum(s for s, _ in sums) / sum(k for _, k in sums), rel=1e-5)


class PositionLM(nn.Module):
    """Two tokens; at window position i the logits are (0, i), so target 0 costs f(i) = log(1 + e^i): the loss
    says at which position of its window each target was predicted."""

    def __init__(self, context: int):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        pos = torch.arange(input_ids.shape[1], dtype=torch.float64).expand(input_ids.shape)
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(pos), pos], -1) + self.anchor)


class CharTokenizer:
    """Token 0 for every character; the EOS (also 0) is the prefix."""

    bos_token_id, eos_token_id, pad_token_id = None, 0, None

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[0] * len(text))


def f(i: int) -> float:
    return math.log1p(math.exp(i))


@pytest.mark.parametrize("stride, positions", [
    # 7 targets, windows of 4: targets 1-4 at positions 0-3; then 5-6 at 2-3 (context from token 2); then 7 at 3
    (2, [0, 1, 2, 3, 2, 3, 3]),
    # disjoint windows: targets 1-4 at 0-3; then the last window ends at 7 and starts at 3: targets 5-7 at 1-3
    (4, [0, 1, 2, 3, 1, 2, 3]),
    (1, [0, 1, 2, 3, 3, 3, 3]),
])
def test_sliding_window_matches_a_hand_computed_case(stride, positions):
    result = perplexity(PositionLM(4), CharTokenizer(), ["abcdefg"], context_length=4, stride=stride, batch_size=3)
    assert result["tokens"] == 7
    assert result["loss"] * 7 == pytest.approx(sum(f(i) for i in positions), rel=1e-12)


def test_windows_score_every_target_once_with_enough_context():
    rng = random.Random(0)
    for _ in range(500):
        n, context = rng.randint(1, 60), rng.randint(2, 12)
        stride = rng.randint(1, context)
        tokens = list(range(n + 1))
        scored = []
        for w in windows(tokens, context, stride):
            assert 2 <= len(w.ids) <= context + 1 and 1 <= w.scored <= len(w.ids) - 1
            new = w.ids[len(w.ids) - w.scored:]
            scored += new
            first_context = new[0] - w.ids[0]  # tokens visible to the first new target
            assert first_context >= min(new[0], context - stride + 1)
        assert scored == tokens[1:]


def test_bits_per_byte():
    """A uniform model over 4 tokens costs 2 bits a token; 'é' is one token of 2 bytes: 1 bit per byte."""

    class Uniform(PositionLM):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 4, dtype=torch.float64) + self.anchor)

    result = perplexity(Uniform(16), CharTokenizer(), ["éééé", "éé"], batch_size=4)
    assert result["bytes"] == 12 and result["tokens"] == 6
    assert result["bits_per_byte"] == pytest.approx(1.0, rel=1e-12)
    assert result["perplexity"] == pytest.approx(4.0, rel=1e-12)


def test_bad_requests_are_refused(tokenizer):
    model = PositionLM(4)
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(model, CharTokenizer(), ["abc"], context_length=4, stride=5)
    with pytest.raises(ValueError, match="no text to score"):
        perplexity(model, CharTokenizer(), ["", ""])


def test_command_line(tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = HELMForCausalLM(load_config("helm_d_tiny", vocab_size=len(tokenizer), num_hidden_layers=1))
    save_model_dir(model, tokenizer, tmp_path / "model")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["perplexity", str(tmp_path / "model"), "--data", str(data), "--json", "--stride", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = perplexity(model, tokenizer, TEXTS, stride=64)
    assert out["loss"] == pytest.approx(expected["loss"], rel=1e-6) and out["tokens"] == expected["tokens"]
    (tmp_path / "empty.txt").write_text("")
    for argv, phrase in (([str(tmp_path / "model"), "--data", str(tmp_path / "empty.txt")], "no text to score"),
                         ([str(tmp_path / "nope"), "--data", str(data)], "not a model directory"),
                         ([str(tmp_path / "model"), "--data", str(tmp_path / "missing.txt")], "no files match"),
                         ([str(tmp_path / "model")], "say what to score"),
                         ([str(tmp_path / "model"), "--data", str(data), "--val-of", "tiny"], "say what to score"),
                         ([str(tmp_path / "model"), "--data", str(data), "--stride", "0"], "stride must be in")):
        assert main(["perplexity", *argv]) == 2
        assert phrase in capsys.readouterr().err


def test_documents_of_a_split_are_the_prepared_ones(tmp_path):
    """``documents_of_split`` yields exactly the documents the prepared shards put in that split."""
    from helmlm.config import DataConfig
    from helmlm.data.packing import PackedRows
    from helmlm.data.shards import documents_of_split, prepare_data

    docs = [f"document number {i} " + "word " * (i % 7 + 1) for i in range(200)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = DataConfig(source="local", paths=[str(tmp_path / "docs.jsonl")], dir=str(tmp_path / "data"),
                        vocab_size=300, val_fraction=0.1)
    prepare_data(config, progress=False)
    val = list(documents_of_split(config, "val"))
    train = list(documents_of_split(config, "train"))
    assert sorted(val + train) == sorted(docs) and 5 <= len(val) <= 40
    assert PackedRows(tmp_path / "data", "val", 32).shards.num_documents == len(val)
