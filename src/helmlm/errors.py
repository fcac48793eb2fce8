"""The errors a user can cause, under one base class.

Every error that bad input can cause (a config key, a data file, a checkpoint, a generation request, a diverging
run) is a :class:`HelmlmError`: the command line prints its message, which says what was wrong and what to do, and
exits with status 2 without a traceback. Anything else that escapes is a bug and keeps its traceback. Each class also
derives from the built-in exception it refines (``ValueError`` for bad values, ``RuntimeError`` for a failing run),
so ``except ValueError`` keeps working for callers that predate this module.

Layers in :mod:`helmlm.nn` raise plain ``ValueError`` for invalid constructor arguments: those are programming errors,
and the model config validates every such value before a layer is built.

This module imports nothing, so every package can use it (and ``helmlm --help`` stays fast).
"""

from __future__ import annotations


class HelmlmError(Exception):
    """Base class of every user-facing error; the message says what was wrong and what to do."""


class ConfigError(HelmlmError, ValueError):
    """A model or training config is invalid: unknown key, wrong type, out-of-range or inconsistent value, missing
    config file."""


class InputError(HelmlmError, ValueError):
    """A model was called with invalid inputs (shapes, ids out of range, positions beyond the context)."""


class DataError(HelmlmError, ValueError):
    """Bad data input: no files, empty corpus, binary file, missing field, unreadable or mismatched shards."""


class CorpusBuildError(HelmlmError, RuntimeError):
    """Building the built-in corpus failed: download, hash mismatch, unsafe or empty archive, bad output dir."""


class SourceToolMissing(CorpusBuildError):
    """The download tool (npm or pip) that some built-in sources need is not available."""


class CheckpointError(HelmlmError, ValueError):
    """A checkpoint is missing, damaged or does not fit; the message names it and says what to do."""


class ExportError(HelmlmError, ValueError):
    """The checkpoint, tokenizer or output directory of an export cannot be used."""


class GenerationError(HelmlmError, ValueError):
    """An invalid generation request: empty prompt, too long, bad sampling values, not a model directory."""


class ContextLengthError(GenerationError):
    """The prompt plus the tokens asked for do not fit in the model's context window."""


class ServerBusy(HelmlmError, RuntimeError):
    """The server's request queue is full; the client should retry later (HTTP 429)."""


class APIError(HelmlmError, ValueError):
    """A bad request to ``helmlm serve``'s API, answered with HTTP ``status`` and OpenAI's error shape (``body``)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


class EvalError(HelmlmError, ValueError):
    """An evaluation request that cannot run: unknown task, bad task data, missing model, existing output file."""


class TrainingError(HelmlmError, RuntimeError):
    """The run cannot start or go on (bad resume, vocabulary mismatch, ...)."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN/inf; nothing was updated or saved at that step. ``event`` describes it
    (step, what, value, the stream rows of the step) for the run's metrics."""

    def __init__(self, message: str, event: dict | None = None):
        super().__init__(message)
        self.event = event or {}


class StorageError(HelmlmError, RuntimeError):
    """Writing failed for a reason the user can fix: a full disk or quota, a read-only directory, a denied
    permission, or another process writing the same directory. The message says what failed, where, what survived
    and how to continue."""


class ReferenceCompatError(HelmlmError, ValueError):
    """A reference checkpoint cannot be loaded: missing or unexpected keys, shapes, unsupported architecture."""


class AdapterError(HelmlmError, ValueError):
    """A fine-tuning adapter that cannot be used: not a PEFT adapter directory, weights not in safetensors, or an
    operation the adapter does not support."""


class HypLoraMergeError(AdapterError):
    """A HypLoRA adapter cannot be merged into the base weight: its update is not linear in the input."""


def did_you_mean(word: str, choices) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to a mistyped ``word``, or ``""`` when none is close: the
    one suggestion rule of every message that names an unknown preset, recipe, sweep, key or component."""
    import difflib

    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
