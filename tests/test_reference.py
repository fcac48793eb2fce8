"""Parity with the reference HELM-D implementation (golden fixture + a literal transcription for other shapes)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_reference_fixture
from reference_impl import random_reference_state_dict, reference_helm_d_logits
from safetensors.torch import save_file

from helmlm.compat import ReferenceCompatError, load_reference
from helmlm.compat.reference import REFERENCE_DEFAULTS


@pytest.fixture(scope="module")
def fixture():
    meta, tensors, state = load_reference_fixture("helm_d_tiny")
    ctor = meta["constructor"]
    flags = dict(model_name="HELM_D", arch=ctor["arch"], vocab_size=ctor["vocab_size"],
                 max_seq_len=ctor["context_length"])
    return meta, tensors, state, flags


def test_fixture_logits_causal_and_document_masked(fixture):
    """fp64 logits of the reference's causal and document-masked forwards are reproduced to <= 1e-5."""
    _, t, state, flags = fixture
    model = load_reference(state, **flags)
    assert next(model.parameters()).dtype == torch.float64
    with torch.no_grad():
        causal = model(t["input_ids"]).logits
        docs = model(t["input_ids"], document_ids=t["sequence_id"]).logits
    assert (causal - t["logits"]).abs().max().item() <= 1e-5
    assert (docs - t["logits_docmask"]).abs().max().item() <= 1e-5
    # the document mask matters here: a model ignoring it would be ~1e-1 off
    assert (t["logits"] - t["logits_docmask"]).abs().max().item() > 1e-2


def test_literal_transcription_matches_fixture(fixture):
    """The independent transcription used for other shapes reproduces the fixture (so it is a valid oracle)."""
    _, t, state, flags = fixture
    arch = (2, 66, 2)
    assert flags["arch"] == "L2_W66_A2"
    out = reference_helm_d_logits(state, arch, t["input_ids"])
    out_doc = reference_helm_d_logits(state, arch, t["input_ids"], t["sequence_id"])
    assert (out - t["logits"]).abs().max().item() <= 1e-6
    assert (out_doc - t["logits_docmask"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "arch,heads_tuple,vocab,max_seq_len",
    [("L3_W42_A2", (3, 42, 2), 300, 40), ("L1_W99_A3", (1, 99, 3), 1000, 24), ("L2_W130", (2, 130, 2), 64, 32)],
)
def test_other_shapes_of_the_family(arch, heads_tuple, vocab, max_seq_len):
    """Other arch strings, vocabularies and context lengths (including the default head count W//64)."""
    sd = random_reference_state_dict(heads_tuple, vocab, max_seq_len, seed=1)
    model = load_reference(sd, model_name="HELM_D", arch=arch, vocab_size=vocab, max_seq_len=max_seq_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, max_seq_len), generator=g)
    seq_id = torch.cumsum(torch.rand(2, max_seq_len, generator=g) < 0.15, dim=1)
    with torch.no_grad():
        for doc in (None, seq_id):
            ours = model(ids, document_ids=doc).logits
            ref = reference_helm_d_logits(sd, heads_tuple, ids, doc)
            assert (ours - ref).abs().max().item() <= 1e-9


def test_file_formats_and_wrappers(fixture, tmp_path):
    """A .safetensors file and a .pt training checkpoint (model_state_dict, DDP 'module.' prefix) load the same."""
    _, t, state, flags = fixture
    st_path = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
    pt_path = tmp_path / "Step100.pt"
    torch.save({"global_step": 100, "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer_state_dict": {}}, pt_path)
    expected = load_reference(state, **flags)(t["input_ids"]).logits
    for source in (st_path, str(pt_path)):
        got = load_reference(source, **flags)(t["input_ids"]).logits
        assert torch.equal(got, expected)


def test_whole_reference_namespace_accepted_and_dtype(fixture):
    """The reference's whole argparse namespace may be passed; training-only flags are ignored; dtype is honoured."""
    _, t, state, flags = fixture
    namespace = {**REFERENCE_DEFAULTS, **flags, "lr": 1.0, "seed": 7, "CHECKPOINT_DIR": "/nowhere"}
    model = load_reference(state, dtype=torch.float32, **namespace)
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        diff = (model(t["input_ids"]).logits.double() - t["logits"]).abs().max().item()
    assert diff < 1e-3


def test_dead_parameters_dropped(fixture):
    """The attention score bias and the unused embedding residual are accepted and not part of the model."""
    _, _, state, flags = fixture
    model = load_reference(state, **flags)
    names = set(model.state_dict())
    assert not any(n.endswith("attn.bias") or "add_pos" in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == 211646 - 4  # reference trainable - 2 biases - 2 add_pos


def test_missing_and_unexpected_keys_are_named(fixture):
    _, _, state, flags = fixture
    broken = {k: v for k, v in state.items() if k != "resblocks.1.mlp.w2.linear.bias"}
    broken["resblocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ReferenceCompatError, match=r"missing keys \['resblocks\.1\.mlp\.w2\.linear\.bias'\]") as e:
        load_reference(broken, **flags)
    assert "resblocks.0.attn.extra.weight" in str(e.value)


def test_wrong_flags_give_clear_errors(fixture):
    _, _, state, flags = fixture
    with pytest.raises(ReferenceCompatError, match=r"vocab_size=1000"):
        load_reference(state, **{**flags, "vocab_size": 1000})
    with pytest.raises(ReferenceCompatError, match=r"max_seq_len=64"):
        load_reference(state, **{**flags, "max_seq_len": 128})
    with pytest.raises(ReferenceCompatError, match=r"missing keys .*resblocks\.2"):
        load_reference(state, **{**flags, "arch": "L3_W66_A2"})
    with pytest.raises(ReferenceCompatError, match=r"unknown reference flags \['archh'\]"):
        load_reference(state, archh="L2_W66_A2")
    with pytest.raises(ReferenceCompatError, match=r"HELM_MiCE"):
        load_reference(state, **{**flags, "model_name": "HELM_MiCE"})


def test_arch_constraints_named():
    """An arch whose heads have an odd number of HoPE-rotated space dims is rejected, naming the dim and why."""
    with pytest.raises(ReferenceCompatError, match=r"rotary dim 31 is odd.*32 ambient coordinates"):
        load_reference({}, model_name="HELM_D", arch="L2_W64_A2")
    with pytest.raises(ReferenceCompatError, match=r"not divisible by num_attention_heads=4"):
        load_reference({}, model_name="HELM_D", arch="L2_W66_A4")
    with pytest.raises(ReferenceCompatError, match=r"not of the form"):
        load_reference({}, model_name="HELM_D", arch="W66")


def test_never_unpickles(tmp_path):
    """A .pt file holding an arbitrary pickled object is refused (weights_only=True), not executed."""
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": Evil()}, path)
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        load_reference(path, model_name="HELM_D", arch="L2_W66_A2")
