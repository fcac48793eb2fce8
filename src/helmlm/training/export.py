"""``helmlm export CHECKPOINT OUT_DIR``: a training checkpoint -> a Hugging Face model directory.

The directory holds ``config.json`` + ``model.safetensors`` and the tokenizer the model was trained with. Its
format (``--format``, default ``auto``): the LLaMA-style twin (euclidean + mha + dense SwiGLU) is written as a
standard ``LlamaForCausalLM``, which ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads with no helmlm at all;
every other model in the HELM format, which loads after ``import helmlm`` or, without it, with
``trust_remote_code=True`` (the directory carries a module that imports the installed helmlm). This module reads
the training checkpoint and finds its tokenizer; writing the directory is :func:`helmlm.models.hf.save_model_dir`,
next to the rest of the Hugging Face integration.
"""

from __future__ import annotations

import sys
from pathlib import Path

from helmlm.errors import ExportError  # noqa: F401  (re-exported)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (``.../step-XXXXXXXX``, verified), or a run directory (its newest intact checkpoint;
    damaged newer ones are reported on stderr)."""
    from helmlm.training.checkpoint import CheckpointError, find_checkpoint

    try:
        return find_checkpoint(path, log=lambda msg: print(msg, file=sys.stderr, flush=True))[0]
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def load_checkpoint_model(checkpoint: str | Path, tokenizer: str | Path | None = None):
    """``(model, tokenizer)`` of a training checkpoint or run directory (:func:`resolve_checkpoint`), in memory:
    the tokenizer is ``tokenizer`` or, by default, the one in the run's data directory, checked against the hash
    recorded in the checkpoint; the model's EOS and pad ids are the tokenizer's EOS."""
    from helmlm.training.checkpoint import read_checkpoint_state

    ckpt = resolve_checkpoint(checkpoint)
    return _load_checkpoint(ckpt, read_checkpoint_state(ckpt), tokenizer)


def _load_checkpoint(ckpt: Path, state: dict, tokenizer: str | Path | None):
    from helmlm.config import train_config_from_dict
    from helmlm.data.tokenizer import load_tokenizer, tokenizer_hash
    from helmlm.models import HELMForCausalLM
    from helmlm.training.checkpoint import checkpoint_model_config, read_tensors

    config = train_config_from_dict(state["config"])
    tok_path = Path(tokenizer) if tokenizer is not None else Path(config.data.dir) / "tokenizer"
    if tokenizer is None and not tok_path.is_dir():
        raise ExportError(f"the run's tokenizer is not at {tok_path} (its data directory moved?); pass "
                          "--tokenizer DIR")
    tok = load_tokenizer(tok_path)
    if tokenizer is None and tokenizer_hash(tok) != state.get("tokenizer_sha256"):
        raise ExportError(f"the tokenizer at {tok_path} is not the one this checkpoint was trained with (hash "
                          "differs); pass the right one with --tokenizer DIR")
    model_config = checkpoint_model_config(state)
    model_config.eos_token_id = model_config.pad_token_id = tok.eos_token_id
    model = HELMForCausalLM(model_config)
    missing, unexpected = model.load_state_dict(read_tensors(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ExportError(f"{ckpt}/model.safetensors does not fit its own config (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return model.eval(), tok


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
                      format: str = "auto", license: str = "apache-2.0") -> Path:
    """Write the model of ``checkpoint`` and its tokenizer (``tokenizer``, default: the one in the run's data
    directory, checked against the hash recorded in the checkpoint) to ``out_dir``, with a model card
    (:mod:`helmlm.training.model_card`, under ``license``); return ``out_dir``. ``format``: ``auto`` (Llama where the
    architecture is Llama's, else HELM), ``helm`` or ``llama`` (:func:`helmlm.models.hf.save_model_dir`)."""
    from helmlm.models.hf import check_new_dir, resolve_format, save_model_dir
    from helmlm.models.params import count_parameters
    from helmlm.training.checkpoint import checkpoint_model_config, read_checkpoint_state
    from helmlm.training.model_card import model_card

    ckpt = resolve_checkpoint(checkpoint)
    out = check_new_dir(out_dir)
    state = read_checkpoint_state(ckpt)
    resolve_format(checkpoint_model_config(state), format)  # an impossible format fails before the model is built
    model, tok = _load_checkpoint(ckpt, state, tokenizer)
    kind = resolve_format(model.config, format)
    card = model_card(out.name, state, model.config, count_parameters(model.config), kind, license)
    return save_model_dir(model, tok, out, format=format, extra_files={"README.md": card})
