"""The `helmlm` command line: the smoke job trains, `params` counts, bad input exits non-zero with a message."""

from __future__ import annotations

import json

import pytest

from helmlm.cli import main
from helmlm.models import available_presets, load_config
from helmlm.models.params import count_parameters


def test_smoke_loss_falls_and_reports_throughput(capsys):
    assert main(["smoke", "--steps", "6", "--batch", "2", "--seq-len", "16", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["loss_last"] < summary["loss_first"] - 0.5
    assert summary["tokens_per_s"] > 0
    assert "tokens/s" in out


def test_smoke_bf16(capsys):
    assert main(["smoke", "--steps", "2", "--batch", "1", "--seq-len", "8", "--threads", "1", "--bf16"]) == 0


def test_params_prints_counts(capsys):
    assert main(["params", "helm_d_paper", "llama_paper"]) == 0
    out = capsys.readouterr().out
    assert "114,770,242" in out  # reference 114,770,250 less the 8 dead parameters
    assert f"{count_parameters(load_config('llama_paper'))['total']:,}" in out


@pytest.mark.parametrize("small,twin", [("helm_d_tiny", "llama_tiny"), ("helm_d_small", "llama_small"),
                                        ("helm_d_paper", "llama_paper")])
def test_twins_have_matched_parameter_counts(small, twin):
    """Each LLaMA twin preset has its HELM-D's parameter count within 0.02 %."""
    a, b = count_parameters(load_config(small))["total"], count_parameters(load_config(twin))["total"]
    assert abs(a - b) / a < 2e-4
    assert load_config(small).geometry == "lorentz" and load_config(twin).geometry == "euclidean"


def test_presets_all_validate():
    for name in available_presets():
        load_config(name).validate()


def test_bad_inputs_exit_nonzero(capsys, tmp_path):
    assert main(["smoke", "--config", "no_such_preset"]) == 2
    assert "no config file or preset named 'no_such_preset'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 66\n  num_attention_heads: 3\n")
    assert main(["params", str(bad)]) == 2
    assert "rotary dim 21 is odd" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  hiden_size: 66\n")
    assert main(["params", str(typo)]) == 2
    assert "hiden_size" in capsys.readouterr().err
    assert main(["smoke", "--steps", "0"]) == 2


def test_public_api_reexports():
    import helmlm
    from helmlm.compat import load_reference
    from helmlm.models import HELMForCausalLM

    assert helmlm.HELMForCausalLM is HELMForCausalLM and helmlm.load_reference is load_reference
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        helmlm.nope  # noqa: B018
