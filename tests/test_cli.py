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
    assert main(["params", "helm_d_paper_reference", "llama_paper"]) == 0
    out = capsys.readouterr().out
    assert "114,770,242" in out  # reference 114,770,250 less the 8 dead parameters
    assert f"{count_parameters(load_config('llama_paper'))['total']:,}" in out


@pytest.mark.parametrize("small,twin", [("helm_d_tiny", "llama_tiny"), ("helm_d_small", "llama_small"),
                                        ("helm_d_paper", "llama_paper"), ("helm_mice_tiny", "deepseek_tiny"),
                                        ("helm_mice_small", "deepseek_small"), ("helm_mice_120m", "deepseek_120m"),
                                        ("helm_mice_1b", "deepseek_1b")])
def test_twins_have_matched_parameter_counts(small, twin):
    """Each Euclidean twin preset has its hyperbolic model's parameter count within 0.02 % (and, for the MoE
    twins, the active count within 1 %), with the same attention/FFN kinds."""
    a, b = count_parameters(load_config(small)), count_parameters(load_config(twin))
    assert abs(a["total"] - b["total"]) / a["total"] < 2e-4
    assert abs(a["active"] - b["active"]) / a["active"] < 1e-2
    ca, cb = load_config(small), load_config(twin)
    assert ca.geometry == "lorentz" and cb.geometry == "euclidean"
    assert (ca.attention, ca.ffn, ca.num_hidden_layers) == (cb.attention, cb.ffn, cb.num_hidden_layers)


MICE_120M_FLAGS = dict(dim=390, n_layers=6, n_dense_layers=1, n_heads=6, n_routed_experts=4, n_activated_experts=2,
                       n_shared_experts=1, inter_dim=1560, mice_inter_dim=780, kv_lora_rank=65, qk_nope_head_dim=33,
                       qk_rope_head_dim=17, v_head_dim=33, train_curv=True, project_emb=False)
MICE_1B_FLAGS = dict(dim=910, n_layers=16, n_dense_layers=1, n_heads=14, n_routed_experts=8, n_activated_experts=2,
                     n_shared_experts=1, inter_dim=3640, mice_inter_dim=1820, kv_lora_rank=257, qk_nope_head_dim=65,
                     qk_rope_head_dim=65, v_head_dim=65, train_curv=False, project_emb=True)


@pytest.mark.parametrize("preset,flags,ref_trainable,dead,paper_mode_fewer,active_millions", [
    # 120M: reference 126,357,120 trainable. Dead there: 2 embedding-residual scalars, 6 attention score biases,
    # 20 gate biases (Parameters that only select, so never get a gradient; buffers here).
    ("helm_mice_120m", MICE_120M_FLAGS, 126_357_120, 2 + 6 + 20, 10, 117.2),
    # 1B: reference 966,829,461 total less 123 frozen curvatures; dead: 16 attention biases, 120 gate biases
    # (project_emb has no embedding residual).
    ("helm_mice_1b", MICE_1B_FLAGS, 966_829_461 - 123, 16 + 120, 30, 519.6),
])
def test_mice_paper_preset_counts_match_the_reference(preset, flags, ref_trainable, dead, paper_mode_fewer,
                                                       active_millions):
    """The reference-mode model of the paper's flags has the reference's trainable count less its dead
    parameters; the preset (paper combination) has fewer by the reference combination's 2 learnable residual
    scalars per MiCE layer; active parameters per token are the paper's."""
    from helmlm.compat.reference import reference_config

    reference_mode = count_parameters(reference_config(model_name="HELM_MiCE", vocab_size=128256, max_seq_len=2048,
                                                       original_seq_len=4096, **flags))
    assert reference_mode["total"] == ref_trainable - dead
    ours = count_parameters(load_config(f"{preset}_reference"))
    assert ours["total"] == reference_mode["total"] - paper_mode_fewer
    assert round(ours["active"] / 1e6, 1) == active_millions


def test_params_json_lines(capsys):
    assert main(["params", "--json", "helm_mice_120m_reference", "deepseek_120m"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["config"] for line in lines] == ["helm_mice_120m_reference", "deepseek_120m"]
    assert lines[0]["total"] == 126_357_082 and lines[0]["active"] < lines[0]["total"]


@pytest.mark.parametrize("preset", ["helm_mice_tiny", "deepseek_tiny"])
def test_smoke_moe_presets_learn(preset, capsys):
    assert main(["smoke", "--config", preset, "--steps", "6", "--batch", "2", "--seq-len", "16", "--threads", "1",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["loss_last"] < summary["loss_first"] - 0.5


@pytest.mark.parametrize("preset", ["helm_d_tiny", "helm_d_small", "helm_d_paper", "helm_mice_tiny",
                                    "helm_mice_small", "helm_mice_120m", "helm_mice_1b"])
def test_reference_presets_differ_only_in_the_issue_32_settings(preset):
    """Each HELM preset and its ``_reference`` twin build the same architecture; they differ exactly in the settings
    issue 32 changed (the token table's storage and start; HMLA's initialisation and residual multiplier; the final
    projection, whose parameters went to the FFN), which the reference preset sets to the reference's values."""
    ours, reference = load_config(preset).to_dict(), load_config(f"{preset}_reference").to_dict()
    changed = {k for k in ours if ours[k] != reference[k]}
    if ours["ffn"] == "dense":  # the unused MoE width follows intermediate_size
        changed.discard("moe_intermediate_size")
    mla = {"mla_init", "residual_scale"} if ours["attention"] == "mla" else set()
    expected = ({"embedding_init_scale", "final_projection", "intermediate_size"} | mla
                | (set() if preset == "helm_mice_1b" else {"project_emb"}))
    assert changed == expected
    assert reference["embedding_init_scale"] == 1.0 and reference["mla_init"] == "xavier"
    assert reference["project_emb"] == (preset == "helm_mice_1b")
    assert reference["final_projection"] and not ours["final_projection"]
    assert ours["intermediate_size"] > reference["intermediate_size"]


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
