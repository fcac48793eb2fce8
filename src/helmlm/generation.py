"""Text generation with the KV cache: greedy, temperature, top-k, top-p, repetition penalty, EOS, seeds, batches of
prompts of different lengths (left padding), streaming; :func:`complete` adds text-level stop strings and streaming
of whole characters, and :func:`load_model_dir` opens a model directory (what ``helmlm generate`` runs on).

Two decoding loops run on the same model forward and the same KV cache (``helmlm.models.HELMCache``):
``model.generate(...)`` (transformers' ``GenerationMixin``: beam search, logits processors, ``pipeline``, lm-eval)
and :func:`generate` here, which ``helmlm generate`` and :func:`complete` use. Ours stays because:

- its decoding is exactly what its arguments say. ``model.generate`` fills every unset option from the model
  directory's ``generation_config.json`` and transformers' defaults (EOS, top-k, penalties, ...), so the same call
  can decode differently from one directory or transformers release to the next;
- its streamer gets each step's token per row (``None`` once a row is finished) and ``stop(row, ids)`` ends single
  rows, what :func:`complete` needs for stop strings and whole-character streaming;
- speed is not a reason either way: both loops run the same cached forward, and ours is 1.00-1.19x as fast on the
  tiny presets (``benchmarks/decode.py --generate-at``; docs/evaluation.md). Ours also has a compiled mode
  (``compile=True``): the prompt runs through the ordinary forward, then the cache is copied into fixed-capacity
  buffers (:class:`~helmlm.nn.cache.StaticModelCache`) and every step is one ``torch.compile`` graph
  (:meth:`~helmlm.models.HELMForCausalLM.static_step`), which fuses the many small per-token Lorentz operations.

``tests/test_hf_generate.py`` pins the two together: greedy decoding of a left-padded batch gives the same tokens.
Semantics follow transformers' otherwise: the repetition penalty divides positive logits and multiplies negative
ones of every token already in the row (prompt included); then temperature, top-k and top-p (nucleus) filter the
distribution; ``temperature=0`` is greedy.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from helmlm.errors import ContextLengthError, GenerationError  # noqa: F401  (GenerationError re-exported)
from helmlm.models.modeling import CACHE_FIELD, output_cache
from helmlm.nn.cache import StaticModelCache

MIN_STATIC_CAPACITY = 256  # compiled decoding: the smallest static cache (see static_capacity)


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: fresh randomness on every call (see :func:`fresh_seed`)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")


def next_token_scores(logits: Tensor, history: Tensor, history_mask: Tensor, s: SamplingSettings) -> Tensor:
    """Logits ``(B, V)`` after the repetition penalty, temperature, top-k and top-p (filtered entries are -inf)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, history_mask.bool())
        penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if s.temperature == 0:
        return logits
    logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def fresh_seed() -> int:
    """A seed from the operating system's entropy: what sampling uses when no seed is given, so that two calls
    differ (torch's unseeded ``Generator`` always starts from the same default seed)."""
    return secrets.randbits(63)


def check_request(model, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> None:
    """Raise :class:`GenerationError` unless ``prompts`` can be continued under ``settings`` (valid values,
    non-empty prompts), :class:`ContextLengthError` unless prompt + ``max_new_tokens`` fit in the context window."""
    settings.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: every prompt needs at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + settings.max_new_tokens > context:
        raise ContextLengthError(f"prompt of {longest} tokens + max_new_tokens {settings.max_new_tokens} = "
                                 f"{longest + settings.max_new_tokens} exceeds the context window of {context} tokens; "
                                 "shorten the prompt or lower max_new_tokens")


def static_capacity(needed: int, limit: int) -> int:
    """Tokens a static cache holds for ``needed`` tokens: the next power of two, at least
    :data:`MIN_STATIC_CAPACITY`, at most ``limit`` (the context window) unless ``needed`` is larger. Powers of two
    let requests of similar lengths share one compiled graph (each capacity is one compilation) while attention
    runs over at most twice the keys it needs."""
    return max(needed, min(max(MIN_STATIC_CAPACITY, 1 << (needed - 1).bit_length()), limit))


def compiled_step(model) -> Callable:
    """``model.static_step`` under ``torch.compile``, built once per model and kept on it.

    The step is one graph (tested), but ``fullgraph=True`` is not set: dynamo's recompilation limit (8 per code
    object, shared by every model in the process) then becomes a hard error, while without it a step past the limit
    runs eager, correct and slower. Shapes start static; a new batch size or cache capacity compiles once more with
    that dimension dynamic (torch's automatic dynamic shapes)."""
    step = getattr(model, "_compiled_static_step", None)
    if step is None:
        step = torch.compile(model.static_step)
        model._compiled_static_step = step
    return step


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], settings: SamplingSettings | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             streamer: Callable[[list[int | None]], None] | None = None,
             stop: Callable[[int, list[int]], bool] | None = None, compile: bool = False) -> list[list[int]]:
    """Continue every prompt (a list of token ids) by up to ``max_new_tokens`` tokens; a row stops after an EOS
    token (which is kept) or when ``stop(row, generated_ids)`` returns True (e.g. a stop string appeared in the
    decoded text). ``streamer`` receives each step's new token per row (``None`` for finished rows).
    Returns the generated ids per row (prompts excluded).

    ``compile=True`` (helmlm models only): decoding steps run as one compiled graph over a static cache (module
    docstring); the first call per batch size and capacity compiles (seconds to a minute on CPU). The tokens are
    those of the eager loop up to floating-point summation order (tested: the same greedy tokens)."""
    s = settings or SamplingSettings()
    check_request(model, prompts, s)
    if compile and not hasattr(model, "static_step"):
        raise GenerationError(f"compiled decoding needs a helmlm model; {type(model).__name__} has no static_step "
                              "(decode it without compile)")
    longest = max(len(p) for p in prompts)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    device = next(model.parameters()).device
    pad = next(iter(eos), 0)
    ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device)
    generator.manual_seed(s.seed if s.seed is not None else fresh_seed())
    model.eval()
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = output_cache(out), out.logits[:, -1]
    if compile:
        cache = StaticModelCache.from_cache(cache, static_capacity(longest + s.max_new_tokens,
                                                                   model.config.max_position_embeddings))
        step_fn = compiled_step(model)
    history, history_mask = ids, mask
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    result: list[list[int]] = [[] for _ in prompts]
    for step in range(s.max_new_tokens):
        scores = next_token_scores(logits, history, history_mask, s)
        if s.temperature == 0:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        emitted: list[int | None] = [None if finished else t for t, finished in zip(token.tolist(), done.tolist())]
        for row, t in enumerate(emitted):
            if t is not None:
                result[row].append(t)
        if streamer is not None:
            streamer(emitted)
        done |= torch.tensor([t is not None and (t in eos or (stop is not None and stop(row, result[row])))
                              for row, t in enumerate(emitted)], device=device)
        if bool(done.all()) or step == s.max_new_tokens - 1:
            break
        step_mask = torch.ones_like(token).unsqueeze(-1)  # finished rows keep decoding; their output is dropped
        history = torch.cat([history, token.unsqueeze(-1)], dim=1)
        history_mask = torch.cat([history_mask, step_mask], dim=1)
        if compile:
            cache.check_room(1)
            logits = step_fn(token.unsqueeze(-1), next_pos, cache)
            cache.advance(1)
        else:  # the mask of cached + new tokens, as transformers models take it (ours read the new part)
            out = model(token.unsqueeze(-1), attention_mask=history_mask, position_ids=next_pos, use_cache=True,
                        **{CACHE_FIELD: cache})
            logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return result


def load_model_dir(path: str | Path):
    """``(model, tokenizer)`` from a model directory (``helmlm export`` or ``save_pretrained`` output), with errors
    that say what to do when ``path`` is a training run, has no config or no tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
        raise GenerationError(f"{path} is a training run or checkpoint, not a model directory; export it first: "
                              f"`helmlm export {path} OUT_DIR`, then pass OUT_DIR")
    if not (path / "config.json").is_file():
        raise GenerationError(f"{path} is not a model directory (no config.json); create one with "
                              "`helmlm export RUN_DIR OUT_DIR`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise GenerationError(f"no tokenizer in {path} ({err}); export the model with its tokenizer") from None
    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path), tokenizer


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def complete(model, tokenizer, prompt_ids: Sequence[int], settings: SamplingSettings,
             stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None, compile: bool = False,
             stats: dict | None = None) -> str:
    """The text that continues ``prompt_ids``, ending before the first of the ``stop`` strings (or at EOS, or after
    ``max_new_tokens``). ``on_text`` receives the text as it is generated, in pieces that never include a part of
    a stop string or half of a multi-byte character; their concatenation is the returned text. ``compile``: as in
    :func:`generate`. ``stats``, when given, receives ``tokens`` (how many were generated, EOS included) and
    ``finish``: ``length`` when ``max_new_tokens`` ended it, else ``stop`` (EOS or a stop string)."""
    eos = tokenizer.eos_token_id
    hold = max((len(s) for s in stop), default=1) - 1  # what may still become a stop string is held back
    pieces: list[int] = []
    shown = ""

    def stream(step: list[int | None]) -> None:
        nonlocal shown
        if on_text is None or step[0] is None or step[0] == eos:
            return
        pieces.append(step[0])
        text = _cut_at_stop(tokenizer.decode(pieces), stop)
        text = text[: len(text) - hold] if hold else text
        if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for a whole multi-byte character
            on_text(text[len(shown):])
            shown = text

    def stopped(row: int, generated: list[int]) -> bool:
        return any(s in tokenizer.decode(generated) for s in stop)

    out = generate(model, [list(prompt_ids)], settings, eos_token_id=eos, streamer=stream,
                   stop=stopped if stop else None, compile=compile)[0]
    decoded = tokenizer.decode([t for t in out if t != eos])
    text = _cut_at_stop(decoded, stop)
    if stats is not None:
        ended = eos in out or len(text) < len(decoded)
        stats.update(tokens=len(out), finish="length" if len(out) >= settings.max_new_tokens and not ended else "stop")
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
