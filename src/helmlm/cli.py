"""The ``helmlm`` command line. Every subcommand is a thin wrapper over a documented library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _cmd_smoke(args: argparse.Namespace) -> int:
    """Forward/backward smoke run: build a model, overfit one fixed random batch, print loss and tokens/s."""
    import geoopt
    import torch

    from helmlm.models import HELMForCausalLM, load_config
    from helmlm.models.params import count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = load_config(args.config, max_position_embeddings=max(args.seq_len, 1))
    model = HELMForCausalLM(config).train()
    n_params = count_parameters(config)["total"]
    # Riemannian Adam treats the Lorentz embedding (a geoopt ManifoldParameter) on its manifold, the rest as Adam.
    optimizer = geoopt.optim.RiemannianAdam(model.parameters(), lr=args.lr, stabilize=10)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    print(f"helmlm smoke: {config.geometry} model, {n_params:,} parameters, batch {args.batch} x {args.seq_len} "
          f"tokens, {torch.get_num_threads()} threads{', bf16 autocast' if args.bf16 else ''}", flush=True)
    losses, start = [], None
    for step in range(args.steps + 1):  # step 0 is a warm-up, not timed
        if step == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            print(f"error: non-finite loss {loss.item()} at step {step}", file=sys.stderr)
            return 1
        losses.append(loss.item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
    elapsed = time.perf_counter() - start
    tokens_per_s = args.batch * args.seq_len * args.steps / elapsed
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; train throughput {tokens_per_s:,.0f} tokens/s")
    if args.json:
        print(json.dumps({"params": n_params, "loss_first": losses[0], "loss_last": losses[-1],
                          "tokens_per_s": tokens_per_s}))
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    """Print parameter counts of configs (paths or preset names): trainable total, embedding, head, the rest, and
    active per token (total less the routed experts a token does not use)."""
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
    """Prepare (or finish preparing) the data of a training config: corpus, tokenizer, shards."""
    from helmlm.data.packing import PackedRows
    from helmlm.data.shards import prepare_data, read_manifest
    from helmlm.training.config import load_train_config

    config = load_train_config(*_config_and_overrides(args))
    data_dir = prepare_data(config.data, progress=True)
    manifest = read_manifest(data_dir)
    rows = PackedRows(data_dir, "train", config.train.seq_len)
    summary = {"dir": str(data_dir), "documents": manifest["documents_read"],
               "train_tokens": manifest["splits"]["train"]["tokens"], "val_tokens": manifest["splits"]["val"]["tokens"],
               "tokenizer_size": manifest["tokenizer"]["size"], "replaced_bytes": manifest["text"]["replaced_bytes"],
               "rows": rows.num_rows, "seq_len": rows.seq_len, "packing_efficiency": round(rows.stats.efficiency, 4),
               "warnings": manifest.get("warnings", [])}
    print(json.dumps(summary) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in summary.items()))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """Pretrain from a YAML config with key=value overrides; under torchrun, one process per device."""
    from helmlm.training.config import load_train_config
    from helmlm.training.trainer import train

    config = load_train_config(*_config_and_overrides(args))
    metrics = train(config, resume=args.resume_from or args.resume, extend=args.extend)
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))
    return 0


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


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job: offline corpus -> BPE -> shards -> tiny HELM-D and its LLaMA twin on the same tokens."""
    from helmlm.training.demo import format_table, run_demo

    rows = run_demo(args.out, tuple(args.models), tuple(args.overrides), threads=args.threads)
    print("\n" + format_table(rows))
    print(f"\ncheckpoints: {', '.join(r['checkpoint'] for r in rows)}; results: {args.out}/results.json")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """A training checkpoint (or run directory) -> a Hugging Face model directory with its tokenizer."""
    from helmlm.training.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer)
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) after `import helmlm`")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a saved model directory (``helmlm export`` output), streaming tokens to stdout."""
    import torch

    from helmlm.generation import GenerationError, SamplingSettings, check_request, fresh_seed, generate

    seed = args.seed if args.seed is not None else fresh_seed()
    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                args.repetition_penalty, seed)
    settings.validate()  # before any loading
    model_dir = Path(args.model_dir)
    if (model_dir / "checkpoints").is_dir() or (model_dir / "state.json").is_file():
        raise GenerationError(f"{model_dir} is a training run or checkpoint, not a model directory; export it "
                              f"first: `helmlm export {model_dir} OUT_DIR`, then `helmlm generate OUT_DIR`")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); create one with "
                                "`helmlm export RUN_DIR OUT_DIR`")
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        source = sys.stdin if args.prompts_file in (None, "-") else open(args.prompts_file, encoding="utf-8")
        with source:
            prompts = [line.rstrip("\n") for line in source if line.strip()]
        if not prompts:
            raise GenerationError("no prompts: give --prompt, or a file / stdin with one prompt per line")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no tokenizer in {model_dir} ({err}); export the model with its tokenizer") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise GenerationError(f"empty prompt {prompt!r}: it encodes to no tokens")
    check_request(model, encoded, settings)  # every prompt fits, before anything is printed
    if args.verbose:
        print(f"seed {seed} (repeat with --seed {seed})", file=sys.stderr, flush=True)
    for prompt, ids in zip(prompts, encoded):
        if args.json:
            out = generate(model, [ids], settings, eos_token_id=tokenizer.eos_token_id,
                           stop=_stop_rule(tokenizer, args.stop))[0]
            text = _cut_at_stop(tokenizer.decode([t for t in out if t != tokenizer.eos_token_id]), args.stop)
            print(json.dumps({"prompt": prompt, "completion": text, "new_tokens": len(out), "seed": seed}))
            continue
        print(prompt, end="", flush=True)
        try:
            _stream_completion(model, tokenizer, ids, settings, args.stop)
        except BaseException:
            print(flush=True)  # an error message must not run on from the text
            raise
    return 0


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _stop_rule(tokenizer, stop: list[str]):
    if not stop:
        return None
    return lambda row, generated: any(s in tokenizer.decode(generated) for s in stop)


def _stream_completion(model, tokenizer, ids: list[int], settings, stop: list[str]) -> None:
    """Print the continuation of ``ids`` as it is generated, holding back what may still become a stop string and
    incomplete multi-byte characters; the output ends before the first stop string."""
    from helmlm.generation import generate

    pieces: list[int] = []
    shown = ""
    hold = max((len(s) for s in stop), default=1) - 1  # never print what may become a stop string

    def stream(step: list[int | None]) -> None:
        nonlocal shown
        if step[0] is None or step[0] == tokenizer.eos_token_id:
            return
        pieces.append(step[0])
        text = _cut_at_stop(tokenizer.decode(pieces), stop)
        text = text[: len(text) - hold] if hold else text
        if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for a whole multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    out = generate(model, [ids], settings, eos_token_id=tokenizer.eos_token_id, streamer=stream,
                   stop=_stop_rule(tokenizer, stop))[0]
    tail = _cut_at_stop(tokenizer.decode([t for t in out if t != tokenizer.eos_token_id]), stop)[len(shown):]
    print(tail, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from helmlm import __version__

    parser = argparse.ArgumentParser(prog="helmlm", description="Hyperbolic large language models.")
    parser.add_argument("--version", action="version", version=f"helmlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    smoke = sub.add_parser("smoke", help="tiny forward/backward run that prints loss and tokens/s")
    smoke.add_argument("--config", default="helm_d_tiny", help="preset name or YAML path (default: helm_d_tiny)")
    smoke.add_argument("--steps", type=int, default=20)
    smoke.add_argument("--batch", type=int, default=4)
    smoke.add_argument("--seq-len", type=int, default=128)
    smoke.add_argument("--lr", type=float, default=3e-3)
    smoke.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    smoke.add_argument("--seed", type=int, default=0)
    smoke.add_argument("--bf16", action="store_true", help="run under CPU bf16 autocast")
    smoke.add_argument("--json", action="store_true", help="also print a JSON summary line")
    smoke.set_defaults(func=_cmd_smoke)

    params = sub.add_parser("params", help="print parameter counts of configs")
    params.add_argument("configs", nargs="+", help="preset names or YAML paths")
    params.add_argument("--json", action="store_true", help="one JSON line per config instead of a table")
    params.set_defaults(func=_cmd_params)

    overrides_help = "section.key=value overrides, e.g. train.lr=1e-3 model.num_hidden_layers=4 data.source=local"
    prepare = sub.add_parser("prepare", help="prepare the data of a training config (corpus, tokenizer, shards)")
    prepare.add_argument("config", nargs="?", help="training YAML or shipped recipe (default: built-in defaults)")
    prepare.add_argument("overrides", nargs="*", help=overrides_help)
    prepare.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    prepare.set_defaults(func=_cmd_prepare)

    demo = sub.add_parser("demo", help="the end-to-end main job: offline corpus, tokenizer, HELM-D vs LLaMA twin",
                          description="Build the offline corpus, train a BPE, pretrain tiny HELM-D and its LLaMA twin "
                                      "on the same tokens, print validation loss/perplexity (recipe: tiny).")
    demo.add_argument("overrides", nargs="*", help=overrides_help)
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--models", nargs="+", default=["helm_d_tiny", "llama_tiny"], help="model presets to compare")
    demo.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    demo.set_defaults(func=_cmd_demo)

    export = sub.add_parser("export", help="turn a training checkpoint into a Hugging Face model directory")
    export.add_argument("checkpoint", help="a checkpoint directory (step-XXXXXXXX) or a run directory (its latest)")
    export.add_argument("out_dir", help="new directory for config.json, model.safetensors and the tokenizer")
    export.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's data directory)")
    export.set_defaults(func=_cmd_export)

    gen = sub.add_parser("generate", help="generate text from a model directory, streaming tokens")
    gen.add_argument("model_dir", help="a directory written by `helmlm export` (config, weights, tokenizer)")
    gen.add_argument("--prompt", default=None, help="the prompt (default: one prompt per line from --prompts-file)")
    gen.add_argument("--prompts-file", default=None, help="file with one prompt per line ('-' or absent: stdin)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None,
                     help="sampling seed for exact repeats (default: fresh randomness on each call)")
    gen.add_argument("--verbose", action="store_true", help="also print the seed used (to stderr)")
    gen.add_argument("--json", action="store_true",
                     help="no streaming: one JSON line per prompt (prompt, completion, new_tokens, seed)")
    gen.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable); the "
                     "output ends before it")
    gen.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    gen.set_defaults(func=_cmd_generate)

    trainp = sub.add_parser("train", help="pretrain a model from a training config",
                            description="Pretrain from a YAML config. Multi-process: torchrun --nproc_per_node N "
                                        "-m helmlm train CONFIG ...")
    trainp.add_argument("config", nargs="?", help="training YAML or shipped recipe (default: built-in defaults)")
    trainp.add_argument("overrides", nargs="*", help=overrides_help)
    trainp.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in out_dir (a damaged newer one is reported "
                             "and skipped); `--resume PATH` continues from that checkpoint or run directory")
    trainp.add_argument("--resume-from", default=None, help=argparse.SUPPRESS)
    trainp.add_argument("--extend", action="store_true",
                        help="with --resume: train a run beyond its planned steps (set a larger train.steps); the "
                             "learning-rate schedule is re-planned as if train.steps had been the total from the start")
    trainp.add_argument("--json", action="store_true", help="print the final metrics as one JSON line")
    trainp.set_defaults(func=_cmd_train)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("steps", "batch", "seq_len"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:  # ConfigError/InputError/DataError: clear messages
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # TrainingError, NonFiniteLossError, corpus build errors
        if type(err).__module__.startswith("helmlm"):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
