"""Exported model directories load anywhere (issue 12): the LLaMA-style twin as a standard ``LlamaForCausalLM``
with the same logits, every other model through the remote-code module its directory carries, in interpreters that
never imported helmlm, and with a message that says how to install helmlm where it is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers.models.llama import modeling_llama

import helmlm  # noqa: F401  (registers the Auto classes)
from helmlm.data.tokenizer import train_bpe
from helmlm.errors import ExportError
from helmlm.models import HELMConfig, HELMForCausalLM, load_config
from helmlm.models.hf import AUTO_MAP, from_llama, resolve_format, save_model_dir, to_llama


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["some text here, and then some more text about the time of water"] * 50, vocab_size=300)


def tiny(preset: str, vocab_size: int, **overrides) -> HELMForCausalLM:
    torch.manual_seed(0)
    model = HELMForCausalLM(load_config(preset, vocab_size=vocab_size, num_hidden_layers=2, **overrides)).eval()
    with torch.no_grad():  # norm weights away from 1, so a norm mapped to the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def fp64_llama_rms_norm(self, x):
    """``LlamaRMSNorm`` without its cast to fp32 (the same formula in the input's dtype)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def fp64_llama_rotary(self, x, position_ids):
    """``LlamaRotaryEmbedding`` with the inverse frequencies and angles in fp64 instead of fp32."""
    dim = 2 * self.inv_freq.shape[0]
    inv_freq = self.config.rope_parameters["rope_theta"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = position_ids[..., None].double() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def test_the_llama_twin_converts_to_llama_with_the_same_logits(monkeypatch):
    """fp64, a non-default rotary base and RMSNorm eps: transformers' Llama computes its RMSNorm and rotary angles
    in fp32 whatever the input dtype, which bounds the agreement to ~1e-7 (asserted below 1e-6); with those two
    casts lifted the logits agree to 1e-10 relative (measured ~1e-15), so every weight, the rotary convention
    (interleaved pairs -> half split), the base and the eps map exactly. And back: from_llama gives our logits bit
    for bit."""
    model = tiny("llama_tiny", 97, rope_theta=5000.0, rms_norm_eps=1e-5).double()
    llama = to_llama(model)
    assert type(llama) is LlamaForCausalLM and llama.dtype == torch.float64 and not llama.training
    assert llama.config.rms_norm_eps == 1e-5 and llama.config.rope_parameters["rope_theta"] == 5000.0
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, stock = model(ids).logits, llama(ids).logits
        assert relative_error(ours, stock) < 1e-6
        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", fp64_llama_rms_norm)
        monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", fp64_llama_rotary)
        assert relative_error(ours, llama(ids).logits) < 1e-10
        back = from_llama(llama)
        assert type(back) is HELMForCausalLM and back.config.rope_theta == 5000.0
        assert torch.equal(back(ids).logits, ours)


def test_only_the_llama_architecture_is_written_as_llama():
    assert resolve_format(load_config("llama_tiny")) == "llama"
    assert resolve_format(load_config("llama_tiny"), "helm") == "helm"
    for preset in ("helm_d_tiny", "helm_mice_tiny", "deepseek_tiny"):
        assert resolve_format(load_config(preset)) == "helm"
    assert resolve_format(load_config("llama_tiny", ffn="moe")) == "helm"
    with pytest.raises(ExportError, match="cannot be written as a LlamaForCausalLM: geometry='lorentz'"):
        resolve_format(load_config("helm_d_tiny"), "llama")
    with pytest.raises(ExportError, match="attention='mla'"):
        resolve_format(load_config("deepseek_tiny"), "llama")
    with pytest.raises(ExportError, match="unknown export format 'gguf'"):
        resolve_format(load_config("llama_tiny"), "gguf")
    with pytest.raises(ExportError, match="cannot be converted"):
        to_llama(HELMForCausalLM(load_config("helm_d_tiny", vocab_size=97, num_hidden_layers=1)))


def test_a_helm_directory_names_its_remote_code(tokenizer, tmp_path):
    """The HELM format carries modeling_helm.py and an auto_map; with helmlm imported, trust_remote_code=True and
    a plain load both give helmlm's own class (transformers prefers the registered one) and the same logits, and
    save_pretrained of an in-process model still writes no remote code."""
    model = tiny("helm_d_tiny", len(tokenizer))
    out = save_model_dir(model, tokenizer, tmp_path / "helm")
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert (out / "modeling_helm.py").is_file() and not (out / "modeling.py").exists()
    ids = torch.randint(0, len(tokenizer), (1, 16))
    for trust in (True, False):
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust)
        assert type(loaded) is HELMForCausalLM
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)) is HELMConfig
    assert HELMConfig._auto_class is None and HELMForCausalLM._auto_class is None  # never marked as custom code
    model.save_pretrained(tmp_path / "plain")
    assert not list((tmp_path / "plain").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())


FRESH = textwrap.dedent("""
    import json, os, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = sys.argv[1]
    ids = load_file(os.path.join(root, "ids.safetensors"))["ids"]
    report = {}
    llama = AutoModelForCausalLM.from_pretrained(os.path.join(root, "llama"))
    AutoTokenizer.from_pretrained(os.path.join(root, "llama"))
    report["llama"] = type(llama).__name__
    report["helmlm_after_llama"] = "helmlm" in sys.modules
    helm_dir = os.path.join(root, "helm")
    helm = AutoModelForCausalLM.from_pretrained(helm_dir, trust_remote_code=True)
    import helmlm.models
    from helmlm.models.hf import save_model_dir
    report["helm_is_helmlm_class"] = type(helm) is helmlm.models.HELMForCausalLM
    report["marked_custom"] = helmlm.models.HELMConfig._auto_class  # the remote-code path ran
    report["plain_load_same_class"] = type(AutoModelForCausalLM.from_pretrained(helm_dir)) is type(helm)
    save_model_dir(helm, AutoTokenizer.from_pretrained(helm_dir), os.path.join(root, "again"))
    report["again"] = sorted(os.listdir(os.path.join(root, "again")))
    with torch.no_grad():
        save_file({"llama": llama(ids).logits, "helm": helm(ids).logits}, os.path.join(root, "logits.safetensors"))
    print(json.dumps(report))
""")


def fresh_env(tmp_path) -> dict[str, str]:
    """Offline, one thread, the remote-code module cache under ``tmp_path``."""
    return {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_exported_directories_load_in_an_interpreter_without_helmlm_imported(tokenizer, tmp_path):
    """A fresh interpreter: the Llama directory loads as LlamaForCausalLM with nothing of helmlm imported (and the
    same logits, to Llama's fp32 casts); the HELM directory loads with trust_remote_code=True as helmlm's own class
    (same logits), a later plain load gives the same class, and re-saving writes our remote code, not copies of
    helmlm's source files."""
    vocab = len(tokenizer)
    llama_twin, helm_d = tiny("llama_tiny", vocab).double(), tiny("helm_d_tiny", vocab).double()
    save_model_dir(llama_twin, tokenizer, tmp_path / "llama", format="auto")
    save_model_dir(helm_d, tokenizer, tmp_path / "helm")
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(2))
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    result = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=fresh_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["llama"] == "LlamaForCausalLM" and report["helmlm_after_llama"] is False
    assert report["helm_is_helmlm_class"] and report["plain_load_same_class"]
    assert report["marked_custom"] == "AutoConfig"
    assert report["again"] == sorted(p.name for p in (tmp_path / "helm").iterdir())
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"] == AUTO_MAP
    logits = load_file(tmp_path / "logits.safetensors")
    with torch.no_grad():
        assert logits["llama"].dtype == torch.float64
        assert relative_error(llama_twin(ids).logits, logits["llama"]) < 1e-6
        assert relative_error(helm_d(ids).logits, logits["helm"]) < 1e-12


def test_without_helmlm_installed_the_error_says_how_to_install_it(tokenizer, tmp_path):
    """``python -S`` with only site-packages on the path: transformers and torch import, the editable helmlm
    (added by a .pth file) does not; loading a HELM directory with trust_remote_code=True says to install helmlm."""
    save_model_dir(tiny("helm_d_tiny", len(tokenizer)), tokenizer, tmp_path / "helm")
    code = textwrap.dedent("""
        import importlib.util, sys
        assert importlib.util.find_spec("helmlm") is None, "helmlm is still importable"
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        except ImportError as err:
            print(type(err).__name__, err)
        else:
            print("loaded")
    """)
    env = {**fresh_env(tmp_path), "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    result = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "helm")], capture_output=True,
                            text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip().splitlines()[-1]
    assert message.startswith("ImportError ") and "helmlm is not installed" in message
    assert "pip install helmlm" in message
