"""Hugging Face integration: save_pretrained / from_pretrained round trips, Auto classes after ``import helmlm``."""

from __future__ import annotations

import geoopt
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import helmlm  # noqa: F401  (registers the Auto classes)
from helmlm.models import HELMConfig, HELMForCausalLM, HELMModel, load_config


@pytest.mark.parametrize("preset", ["helm_d_tiny", "llama_tiny", "helm_mice_tiny", "deepseek_tiny",
                                    "helm_d_tiny_reference"])
def test_save_and_auto_load_reproduce_logits_exactly(preset, tmp_path):
    torch.manual_seed(0)
    model = HELMForCausalLM(load_config(preset, vocab_size=300, num_hidden_layers=2)).eval()
    ids = torch.randint(0, 300, (2, 24))
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors"}
    assert not list(tmp_path.glob("*.bin"))  # weights as safetensors only
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HELMConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HELMForCausalLM
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is HELMModel
    table = loaded.model.embed.weight
    # the loader swaps in plain Parameters; a table of Lorentz points must be a ManifoldParameter again (Riemannian
    # Adam); a table of space parts (project_emb, the shipped presets') stays a plain one (AdamW)
    assert isinstance(table, geoopt.ManifoldParameter) == (model.config.is_lorentz and not model.config.project_emb)
    assert isinstance(table, geoopt.ManifoldParameter) == preset.endswith("_reference")
