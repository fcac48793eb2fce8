"""Scoring generated answers of fine-tuned models (``helmlm finetune-eval``), as the HypLoRA reference scores them.

- ``math``: the last number in the text (commas removed) is the prediction; it is right when it is within ``1e-3``
  of the gold answer's last number.
- ``choice``: the prediction is the first of the task's labels (every gold answer of the data set) that appears in
  the lower-cased text; it is right when it equals the gold label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER = re.compile(r"-?\d+\.?\d*")
TOLERANCE = 1e-3
KINDS = ("math", "choice")


def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas removed), or None."""
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def math_correct(prediction: str, gold: str) -> bool:
    want, got = last_number(gold), last_number(prediction)
    return want is not None and got is not None and abs(got - want) <= TOLERANCE


def first_label(text: str, labels: Sequence[str]) -> str | None:
    """The label that occurs first in the lower-cased ``text`` (the longest one at a tie), or None."""
    text = text.lower()
    hits = [(text.find(label), -len(label), label) for label in labels if label in text]
    return min(hits)[2] if hits else None


def score(predictions: Sequence[str], golds: Sequence[str], kind: str) -> list[bool]:
    """Per example: is the prediction right under ``kind`` (``math`` or ``choice``)?"""
    if kind == "math":
        return [math_correct(p, g) for p, g in zip(predictions, golds)]
    if kind == "choice":
        labels = sorted({g.strip().lower() for g in golds})
        return [first_label(p, labels) == g.strip().lower() for p, g in zip(predictions, golds)]
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def generate_answers(model, tokenizer, examples, max_new_tokens: int = 64, batch_size: int = 8,
                     progress: bool = True) -> list[str]:
    """Greedy completions of the examples' prompts (as :func:`helmlm.data.instructions.prompt_text` frames them in
    training), through ``model.generate`` with its KV cache, in left-padded batches."""
    import torch
    from tqdm.auto import tqdm

    from helmlm.data.instructions import prompt_text

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not tokenizer.chat_template else []
    prompts = [bos + tokenizer(prompt_text(tokenizer, e), add_special_tokens=False)["input_ids"] for e in examples]
    device = next(model.parameters()).device
    outputs = []
    model.eval()
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate", unit="batch"):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                 use_cache=True)[:, width:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def evaluate_answers(base_dir, data, kind: str = "math", adapter_dir=None, max_new_tokens: int = 64,
                     batch_size: int = 8, limit: int | None = None, predictions_path=None, overwrite: bool = False,
                     progress: bool = True) -> dict:
    """Accuracy of a base model, or of a base model with a LoRA / HypLoRA adapter, on instruction data scored as
    ``kind``; with ``predictions_path``, every prompt's completion and verdict as JSONL (an existing file is kept
    unless ``overwrite``)."""
    import json
    from pathlib import Path

    from helmlm.data.instructions import read_instructions
    from helmlm.errors import EvalError
    from helmlm.peft import load_adapter, load_base_model

    if kind not in KINDS:
        raise EvalError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit must be a positive number of examples, got {limit}")
    if predictions_path is not None and Path(predictions_path).exists() and not overwrite:
        raise EvalError(f"{predictions_path} exists; choose another path or pass --overwrite")
    examples = read_instructions(data)[:limit]
    model, tokenizer = load_base_model(base_dir)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    predictions = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, progress)
    verdicts = score(predictions, [e.gold for e in examples], kind)
    if predictions_path is not None:
        Path(predictions_path).write_text("".join(
            json.dumps({"instruction": e.instruction, "gold": e.gold, "prediction": p, "correct": v}) + "\n"
            for e, p, v in zip(examples, predictions, verdicts)))
    return {"kind": kind, "n": len(examples), "correct": sum(verdicts), "accuracy": sum(verdicts) / len(examples),
            "adapter": None if adapter_dir is None else str(adapter_dir), "base": str(base_dir)}
