"""HypLoRA's adapter function as a pure function of its weights (MATH.md section 7, docs/hyplora.md).

A HypLoRA layer computes ``y = W x + (alpha / r) * hyplora_delta(x, A, B, K, rho)``: the input, divided by the input
scale ``rho``, is mapped onto the hyperboloid ``<x, x>_L = -K`` by the exponential map at the origin, transformed
there by the low-rank weights with the time coordinate recomputed on the same hyperboloid, and mapped back to the
tangent space at the origin. Two forms exist:

- ``"paper"`` (the paper's Lorentz low-rank transform): ``A (r, d_in)`` and ``B (d_out, r)`` act on the space part
  only. In closed form, with ``s = sqrt(K) sinh(|x| / (rho sqrt(K))) x / |x|`` and ``z = B A s``,
  ``delta = sqrt(K) asinh(|z| / sqrt(K)) z / |z|``. To first order it is ``B A x / rho``.
- ``"readme"`` (the seed README's code, with one curvature throughout): ``A (r, d_in + 1)`` acts on the whole
  Lorentz point (time first), the time of the result is recomputed, ``B (d_out, r + 1)`` acts on that point, the
  time is recomputed again, and the log map's space part is the output.

The public code recomputes the time with ``1 / K`` instead of ``K``, which pins small updates to a constant magnitude;
both forms here use ``K`` everywhere. Everything runs in fp32 at least (fp64 stays fp64), whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from helmlm.geometry import expmap0, lift, logmap0, promote

Variant = Literal["paper", "readme"]
VARIANTS: tuple[Variant, ...] = ("paper", "readme")


def adapter_shapes(variant: Variant, d_in: int, d_out: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of ``lora_A`` and ``lora_B`` that ``variant`` needs for a ``d_in -> d_out`` layer of rank ``rank``."""
    if variant == "paper":
        return (rank, d_in), (d_out, rank)
    if variant == "readme":
        return (rank, d_in + 1), (d_out, rank + 1)
    raise ValueError(f"HypLoRA variant must be one of {VARIANTS}, got {variant!r}")


def hyplora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, curvature: float | Tensor,
                  input_scale: float | Tensor, variant: Variant = "paper") -> Tensor:
    """The adapter's output for inputs ``x (..., d_in)``, before the ``alpha / r`` scaling: ``(..., d_out)``.

    ``curvature`` is ``K > 0`` of the hyperboloid ``<x, x>_L = -K`` and ``input_scale`` the divisor ``rho`` applied to
    ``x`` first; both may be tensors with gradients. Computed in ``promote(x)``'s dtype (fp32 for bf16 inputs); the
    weights are cast to it.
    """
    expected_A, expected_B = adapter_shapes(variant, x.shape[-1], lora_B.shape[0], lora_A.shape[0])
    if tuple(lora_A.shape) != expected_A or tuple(lora_B.shape) != expected_B:
        raise ValueError(f"HypLoRA ({variant}) for inputs of width {x.shape[-1]} needs lora_A {expected_A} and "
                         f"lora_B {expected_B}; got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    x = promote(x)
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    point = expmap0(x / input_scale, curvature)  # (..., 1 + d_in): time first
    if variant == "paper":
        hidden = point[..., 1:] @ A.T @ B.T  # Lorentz low-rank transform on the space part; time implied
    else:
        hidden = lift(point @ A.T, curvature) @ B.T  # A on the whole point, time recomputed, B likewise
    return logmap0(lift(hidden, curvature), curvature)


def curvature_from_raw(raw: Tensor) -> Tensor:
    """``K = softplus(raw) + 1e-6`` in fp32 at least: the learnable curvature's parametrisation (always > 0)."""
    return torch.nn.functional.softplus(promote(raw)) + 1e-6


def raw_from_curvature(curvature: float) -> float:
    """The raw value whose :func:`curvature_from_raw` is ``curvature``."""
    if curvature <= 1e-6:
        raise ValueError(f"HypLoRA curvature must be > 1e-6, got {curvature}")
    k = curvature - 1e-6
    return k + math.log(-math.expm1(-k))  # softplus^-1(k) = log(e^k - 1), written without overflow for large k
