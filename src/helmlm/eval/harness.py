"""lm-evaluation-harness for helmlm models and any Hugging Face causal LM (``helmlm eval``).

:class:`HelmLM` is registered with lm-eval as ``helmlm``. It is lm-eval's own Hugging Face model (``HFLM``, what
``--model hf`` runs) with helmlm imported first, so a HELM model directory loads without ``trust_remote_code``:
requests are tokenised, batched, truncated and scored by the very code of ``--model hf``, so the scores of the two
are the same by construction, and ``generate_until`` runs on ``HELMForCausalLM.generate`` (the KV caches).
:func:`evaluate` wraps ``lm_eval.simple_evaluate`` with helmlm's local tasks on the include path, checks before
anything runs (task names, with close matches; local JSONL data, naming file and line; the model directory; the
output file), and returns lm-eval's results. The stock ``lm_eval`` command cannot import this module, hence the
wrapper.

Local tasks (``helmlm/eval/tasks``, items written for helmlm, no network): ``helm_local_mc`` (multiple choice),
``helm_local_gen`` (generation), ``helm_local_ppl`` (rolling log-likelihood), the group ``helm_local``; and
``helm_paper``, the paper's table (needs the hub's datasets).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from helmlm.errors import EvalError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("lm-evaluation-harness is not installed: pip install 'helmlm[eval]'") from None


def _quiet_custom_dataset_warning(record) -> bool:
    """lm-eval warns on every load of a task with a Python ``custom_dataset`` (how the local tasks find their JSONL
    next to the YAML) that kwargs can be passed through ``--metadata``; it says nothing about the run."""
    return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _register() -> None:
    """Register :class:`HelmLM` with lm-eval (once)."""
    import logging

    logging.getLogger("lm_eval.api.task").addFilter(_quiet_custom_dataset_warning)  # a no-op when already added
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    import helmlm.models  # noqa: F401  (HELM model directories load through the Auto classes)

    global HelmLM
    if "HelmLM" in globals():
        return

    @register_model("helmlm")
    class HelmLM(HFLM):  # noqa: N801
        """lm-eval's Hugging Face model with helmlm registered; defaults to the CPU when no GPU is visible."""

        def __init__(self, pretrained: str, **kwargs: Any):
            import torch

            kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
            kwargs.setdefault("backend", "causal")
            super().__init__(pretrained=pretrained, **kwargs)

    globals()["HelmLM"] = HelmLM


def task_manager(include_path: str | Path | list[str | Path] | None = None):
    """lm-eval's ``TaskManager`` with helmlm's local tasks and ``include_path`` (a directory or a list) on its
    path."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR, *([] if include_path is None else
                          [include_path] if isinstance(include_path, (str, Path)) else include_path)]
    for path in paths[1:]:
        if not Path(path).is_dir():
            raise EvalError(f"--include-path {path} is not a directory of task YAML files")
    return TaskManager(include_path=[str(p) for p in paths])


def check_tasks(manager, tasks: list[str]) -> None:
    """Every name must be a task, group or tag lm-eval knows; an unknown one is named with its closest matches.
    Local JSON data of the requested tasks is read once, so a malformed line is reported by file and line now."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known and not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, sorted(known), 5, 0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `helmlm eval --list-tasks` lists them"
            raise EvalError(f"unknown task {name!r}{hint}")
    for name in tasks:
        _check_task_data(manager, name, seen=set())


def _check_task_data(manager, name: str, seen: set[str]) -> None:
    """Validate the local JSONL files of task (or group) ``name``: helmlm's ``custom_dataset`` tasks and tasks with
    ``dataset_path: json``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from helmlm.eval.tasks.utils import read_jsonl

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None or name in seen:
        return
    seen.add(name)
    config = load_yaml(entry.yaml_path, resolve_func=False)
    for child in config.get("task", []) if isinstance(config.get("task"), list) else []:
        _check_task_data(manager, child["task"] if isinstance(child, dict) else child, seen)
    kwargs = config.get("dataset_kwargs") or {}
    files = []
    if config.get("dataset_path") == "json":
        data = kwargs.get("data_files", [])
        files = list(data.values()) if isinstance(data, dict) else [data] if isinstance(data, str) else list(data)
    elif "custom_dataset" in config:
        files = [str(Path(entry.yaml_path).parent / v) for v in kwargs.values()
                 if isinstance(v, str) and v.endswith(".jsonl")]
    for file in files:
        for path in (file if isinstance(file, list) else [file]):
            if str(path).endswith((".jsonl", ".json")) and Path(path).is_file():
                try:
                    read_jsonl(path)
                except ValueError as err:
                    raise EvalError(f"task {name}: {err}") from None


def evaluate(model: str | Path, tasks: list[str], include_path: str | Path | None = None,
             num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 1,
             device: str | None = None, dtype: str | None = None, log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval's ``tasks`` on the model directory ``model`` (helmlm or any Hugging Face causal LM) with
    :class:`HelmLM`; return lm-eval's results dictionary (``results``, ``configs``, ``n-shot``, ...)."""
    _require_lm_eval()
    if limit is not None and limit <= 0:
        raise EvalError(f"limit must be > 0 (a count, or a fraction of each task), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    model = Path(model)
    if (model / "checkpoints").is_dir() or (model / "state.json").is_file():
        raise EvalError(f"{model} is a training run or checkpoint; export it first: `helmlm export {model} OUT_DIR`")
    if not (model / "config.json").is_file():
        raise EvalError(f"{model} is not a model directory (no config.json)")
    manager = task_manager(include_path)
    check_tasks(manager, tasks)
    _register()
    import lm_eval

    args: dict[str, Any] = {"pretrained": str(model)}
    if device is not None:
        args["device"] = device
    if dtype is not None:
        args["dtype"] = dtype
    return lm_eval.simple_evaluate(model="helmlm", model_args=args, tasks=tasks, num_fewshot=num_fewshot,
                                   limit=limit, batch_size=batch_size, task_manager=manager,
                                   log_samples=log_samples)


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write lm-eval's results as JSON to ``path`` atomically (non-JSON values become strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """``(task, metric, value, stderr)`` for every numeric metric of every task in ``results``."""
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or key.startswith("alias") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append((task, metric, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows
