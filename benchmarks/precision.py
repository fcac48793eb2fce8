"""How far bf16 autocast moves a model from fp32 (and fp32 from fp64). Prints one JSON line per model.

    python benchmarks/precision.py                       # helm_d_tiny and llama_tiny, batch 4 x 128
    python benchmarks/precision.py --config helm_d_small llama_small --seq-len 256

For each preset: build the model (fixed seed, fp32), run the same random tokens in fp64, fp32 and fp32 under CPU
bf16 autocast, and report max/mean |logits - logits_fp64| for fp32 and bf16, the loss difference, whether the
bf16 backward is finite, and the largest manifold violation of the residual stream under bf16 (Lorentz models).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from helmlm.geometry import manifold_violation
from helmlm.models import HELMForCausalLM, load_config


def run(name: str, batch: int, seq_len: int, seed: int) -> dict:
    torch.manual_seed(seed)
    config = load_config(name, max_position_embeddings=seq_len)
    model = HELMForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    violations: list[float] = []

    def hook(_module, _inputs, output):
        violations.append(manifold_violation(output, config.curvature).max().item())

    with torch.no_grad():
        ref = copy.deepcopy(model).double()(ids, labels=ids)
        fp32 = model(ids, labels=ids)
    handles = [layer.register_forward_hook(hook) for layer in model.model.layers] if config.is_lorentz else []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids, labels=ids)
    for h in handles:
        h.remove()
    bf16.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)

    def err(out):
        d = (out.logits.double() - ref.logits).abs()
        return d.max().item(), d.mean().item()

    return {
        "model": name, "geometry": config.geometry, "batch": batch, "seq_len": seq_len,
        "logits_std": ref.logits.std().item(),
        "fp32_max_abs_err": err(fp32)[0], "fp32_mean_abs_err": err(fp32)[1],
        "bf16_max_abs_err": err(bf16)[0], "bf16_mean_abs_err": err(bf16)[1],
        "loss_fp64": ref.loss.item(), "loss_bf16_minus_fp64": bf16.loss.item() - ref.loss.item(),
        "bf16_logits_dtype": str(bf16.logits.dtype), "bf16_backward_finite": grads_finite,
        "bf16_max_block_manifold_violation": max(violations) if violations else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["helm_d_tiny", "llama_tiny"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.config:
        print(json.dumps(run(name, args.batch, args.seq_len, args.seed)), flush=True)


if __name__ == "__main__":
    main()
