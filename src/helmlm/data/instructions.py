"""Instruction data for fine-tuning (``helmlm finetune``): JSONL records with ``instruction``, an optional ``input``
and ``output`` (optionally ``answer``, the gold answer a scorer compares with), their prompts, and their tokens.

The prompt is the tokenizer's chat template when it has one (the instruction, then the input, as one user turn,
followed by the assistant turn's header); otherwise a plain ``### Instruction / ### Input / ### Response`` frame in
the style of Alpaca. The training loss covers the response and the EOS token only, unless ``train_on_inputs``
(the reference's setting) also puts the prompt under the loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from helmlm.errors import DataError

IGNORE_INDEX = -100  # label of positions outside the loss (PyTorch's cross-entropy default)
RESPONSE_HEADER = "### Response:\n"


@dataclass(frozen=True)
class Instruction:
    instruction: str
    output: str
    input: str = ""
    answer: str | None = None  # the gold answer, when it is not simply the output

    @property
    def gold(self) -> str:
        return self.output if self.answer is None else self.answer


def read_instructions(path: str | Path) -> list[Instruction]:
    """Every record of a JSONL file; a bad line is a :class:`DataError` naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            records.append(_instruction(record, f"{path}:{number}"))
    if not records:
        raise DataError(f"{path} holds no records (one JSON object per line, with instruction and output)")
    return records


def _instruction(record: object, where: str) -> Instruction:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with instruction and output, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"{where}: missing or empty string field {key!r} (fields: instruction, optional input, "
                            "output, optional answer)")
    for key in ("input", "answer"):
        if record.get(key) is not None and not isinstance(record[key], (str, int, float)):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    answer = record.get("answer")
    return Instruction(record["instruction"], record["output"], str(record.get("input") or ""),
                       None if answer is None else str(answer))


def prompt_text(tokenizer, example: Instruction) -> str:
    """The text before the response: the chat template's user turn and assistant header, or the plain frame."""
    request = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                             add_generation_prompt=True)
    text = f"### Instruction:\n{example.instruction}\n\n"
    if example.input:
        text += f"### Input:\n{example.input}\n\n"
    return text + RESPONSE_HEADER


def encode(tokenizer, example: Instruction, max_length: int, train_on_inputs: bool = False) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of prompt + response + EOS, cut at ``max_length`` tokens; the prompt's labels are
    ``IGNORE_INDEX`` unless ``train_on_inputs``."""
    prompt = tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "bos_token_id", None) is not None and not getattr(tokenizer, "chat_template", None):
        prompt = [tokenizer.bos_token_id, *prompt]
    response = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = [*response, tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = (list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + response
    return {"input_ids": ids, "labels": labels[:max_length]}
