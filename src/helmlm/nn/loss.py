"""Cross-entropy of a linear head without the full logits: :func:`linear_cross_entropy`.

A language model's logits ``(tokens, vocab)`` are the largest activation of a small model's training step (8 x 1024
tokens x 8,192 ids: 268 MB in fp32, held for the loss, its fp32 copy and its gradient). Here the head runs over
``chunk`` tokens at a time; each chunk's logits become its loss and, at once, the gradients of the loss with respect
to the chunk's hidden states and to the head's weight (``softmax - one_hot``, then two matmuls), and are freed.
Backward only scales the stored gradients by the incoming one. Peak memory: one chunk of logits instead of all of
them, plus the hidden states' gradient, with the same matmuls as the plain path and no recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, reduction: str) -> Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        acc = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)  # fp32, or fp64
        # The weight's gradient accumulates as (D, V), h^T grad: the faster of the two GEMM layouts, and the chunks
        # add into it inside the GEMM (beta = 1) rather than through a separate pass over it per chunk.
        grad_weight_t = weight.new_zeros(weight.shape[::-1], dtype=acc) if need_weight else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # Without autocast, every chunk's logits go into one buffer: a fresh (chunk, vocab) tensor per chunk pays
        # its page faults again on CPU (the logits GEMM then took 79 instead of 53 ms, docs/LOG.md).
        reuse = not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype == weight.dtype == acc
        buffer = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0]) if reuse else None
        weight_mm = None  # the weight in the products' dtype (a cast under autocast), made once for all chunks
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            if reuse:
                logits = torch.mm(h, weight.t(), out=buffer[: h.shape[0]])
            else:
                logits = F.linear(h, weight)  # the autocast dtype when autocast is on, as the plain head
            matmul_dtype = logits.dtype
            if weight_mm is None:
                weight_mm = weight.to(matmul_dtype)
            logits = logits.to(acc)
            keep = (t != IGNORE_INDEX).to(acc)
            safe = t.clamp(min=0)
            picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            # In place on the chunk's own logits: shift by the row max, exponentiate, sum; the same buffer then
            # becomes the softmax, i.e. the gradient. Five passes over (chunk, vocab) and no second buffer of that
            # size (logsumexp and softmax would allocate one each and read the logits eight times).
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            row_sum = probs.sum(dim=-1, keepdim=True)
            lse = (row_max + row_sum.log()).squeeze(1)
            total += ((lse - picked) * keep).sum()
            if need_hidden or need_weight:
                grad = probs.div_(row_sum)  # d(sum of losses) / d logits = softmax - one_hot, per kept row
                grad[torch.arange(len(t), device=t.device), safe] -= 1
                grad = grad.to(matmul_dtype)
                # Ignored rows are zeroed on the (chunk, hidden) side of the products, not on the logits' side.
                if need_hidden:
                    grad_hidden[start:start + chunk] = ((grad @ weight_mm) * keep.unsqueeze(1)).to(
                        hidden.dtype)
                if need_weight:
                    h_kept = (h * keep.unsqueeze(1).to(h.dtype)).to(matmul_dtype).t()
                    if grad.dtype == acc:
                        grad_weight_t.addmm_(h_kept, grad)
                    else:  # a low-precision product is accumulated in fp32
                        grad_weight_t += h_kept @ grad
        scale = (1.0 / count.clamp(min=1).to(acc) if reduction == "mean"
                 else torch.ones((), dtype=acc, device=hidden.device))
        ctx.save_for_backward(grad_hidden if need_hidden else None,
                              grad_weight_t.t().contiguous().to(weight.dtype) if need_weight else None, scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_output * scale
        return (None if grad_hidden is None else grad_hidden * factor.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * factor.to(grad_weight.dtype), None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 4096,
                         reduction: str = "mean") -> Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` in fp32 (fp64 for fp64 inputs), ``-100`` ignored, without
    holding the logits of more than ``chunk`` rows (module docstring). ``hidden (T, D)``, ``weight (V, D)``,
    ``targets (T,)``; ``reduction``: ``mean`` over the kept targets or ``sum``. Differentiable once (its backward
    reuses gradients computed in forward, so it cannot be differentiated twice)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, reduction)
