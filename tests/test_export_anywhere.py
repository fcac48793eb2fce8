"""Exported model directories load anywhere (issue 12): the LLaMA-style twin as a standard ``LlamaForCausalLM``
with the same logits, every other model through the remote-code module its directory carries, in interpreters that
never imported helmlm, and with a message that says how to install helmlm where it is missing."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


# A fresh interpreter in which helmlm and geoopt cannot be imported (installed or not): what a Hub user has.
WITHOUT_HELMLM = textwrap.dedent("""
    import importlib.abc, json, os, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("helmlm", "geoopt"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

    sys.meta_path.insert(0, Blocked())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, names = sys.argv[1], sys.argv[2].split(",")
    ids = load_file(os.path.join(root, "ids.safetensors"))["ids"]
    out, report = {}, {}
    for name in names:
        directory = os.path.join(root, name)
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        except Exception as err:
            report[name] = f"{type(err).__name__}: {err}"
            continue
        AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        report[name] = type(model).__module__
        with torch.no_grad():
            out[name + ".logits"] = model(ids).logits
            out[name + ".greedy"] = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, use_cache=True,
                                                   pad_token_id=0)
    report["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("helmlm", "geoopt"))
    if out:
        save_file(out, os.path.join(root, "out.safetensors"))
    print(json.dumps(report))
""")


def fresh_env(tmp_path) -> dict[str, str]:
    """Offline, one thread, the remote-code module cache under ``tmp_path``."""
    return {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_without_helmlm(tmp_path, names: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", WITHOUT_HELMLM, str(tmp_path), ",".join(names)],
                            capture_output=True, text=True, timeout=600, env=fresh_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


MODELS = ("helm_d_tiny", "helm_mice_tiny", "deepseek_tiny", "helm_d_tiny_reference")


def test_exported_directories_load_where_neither_helmlm_nor_geoopt_can_be_imported(tokenizer, tmp_path):
    """The remote code generated from helmlm's sources loads HELM-D, HELM-MiCE (HMLA and its latent cache), the
    DeepSeek-style twin and a table of Lorentz points with torch and transformers alone: the logits equal helmlm's to
    1e-6 in fp32 and 1e-12 in fp64, and greedy generation with the cache gives helmlm's tokens."""
    vocab, names, models = len(tokenizer), [], {}
    for preset in MODELS:
        for dtype in (torch.float32, torch.float64):
            name = f"{preset}-{str(dtype)[6:]}"
            models[name] = tiny(preset, vocab).to(dtype)
            save_model_dir(models[name], tokenizer, tmp_path / name)
            names.append(name)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(2))
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    report = run_without_helmlm(tmp_path, names)
    assert report.pop("imported") == []
    out = load_file(tmp_path / "out.safetensors")
    for name, model in models.items():
        assert report[name].startswith("transformers_modules.") and report[name].endswith("helmlm_models_modeling")
        with torch.no_grad():
            logits = model(ids).logits
            greedy = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
        bound = 1e-12 if name.endswith("float64") else 1e-6
        assert (out[name + ".logits"] - logits).abs().max().item() <= bound, name
        assert torch.equal(out[name + ".greedy"], greedy), name


def test_the_bundle_is_generated_from_the_sources_and_imports_neither_helmlm_nor_geoopt(tokenizer, tmp_path):
    """Every exported remote-code file is what the generator makes from the installed sources now (so the bundle
    cannot go stale), and transformers' own import check finds no helmlm or geoopt import in any of them."""
    from transformers.dynamic_module_utils import get_imports

    from helmlm.models.hf import _helmlm_version
    from helmlm.models.remote_code import remote_code_files

    out = save_model_dir(tiny("helm_mice_tiny", len(tokenizer)), tokenizer, tmp_path / "helm")
    files = remote_code_files(_helmlm_version())
    assert sorted(p.name for p in out.glob("*.py")) == sorted(files)
    for name, source in files.items():
        assert (out / name).read_text() == source, name
        assert not {m.split(".")[0] for m in get_imports(out / name)} & {"helmlm", "geoopt"}, name
    # one source of truth: each generated module is its source with only its helmlm imports made relative
    for name in ("helmlm_nn_attention.py", "helmlm_models_modeling.py", "helmlm_nn.py"):
        module = name[:-3].replace("_", ".", 2) if name != "helmlm_nn.py" else "helmlm.nn"
        source = Path(helmlm.__file__).parent.joinpath(*module.split(".")[1:])
        source = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helmlm"):
                node.module, node.level = node.module.replace(".", "_"), 1
        assert ast.dump(ast.parse(files[name])) == ast.dump(tree), name


def test_remote_code_older_than_the_weights_format_says_so(tokenizer, tmp_path):
    out = save_model_dir(tiny("helm_d_tiny", len(tokenizer)), tokenizer, tmp_path / "newer")
    config = json.loads((out / "config.json").read_text())
    assert config["helmlm_format"] == 1
    (out / "config.json").write_text(json.dumps({**config, "helmlm_format": 2}))
    save_file({"ids": torch.zeros(1, 4, dtype=torch.long)}, tmp_path / "ids.safetensors")
    message = run_without_helmlm(tmp_path, ["newer"])["newer"]
    assert "model format 2, and this code reads formats up to 1" in message
    assert "remote code (modeling_helm.py and helmlm_*.py) is older than its weights" in message
    with pytest.raises(ValueError, match="model format 2"):  # helmlm itself refuses it the same way
        HELMForCausalLM.from_pretrained(out)
