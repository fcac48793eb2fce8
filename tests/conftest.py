import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_default_dtype():
    """Tests run in parallel workers (pytest -n 2): one thread each avoids oversubscribing the cores."""
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(torch.float32)


def load_reference_fixture(name: str) -> tuple[dict, dict, dict]:
    """A golden reference fixture from tests/fixtures: ``(sidecar json, all tensors, the reference state dict)``."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    fixtures = Path(__file__).parent / "fixtures"
    meta = json.loads((fixtures / f"{name}.json").read_text())
    tensors = load_file(str(fixtures / f"{name}.safetensors"))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return meta, tensors, state


def save_tiny_llama(tokenizer, path):
    """A tiny random transformers Llama (not a helmlm model) for ``tokenizer`` (its EOS doubles as BOS and pad),
    saved with the tokenizer to ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256,
                                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
