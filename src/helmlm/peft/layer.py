"""HypLoRA inside PEFT: ``peft.get_peft_model(model, HypLoraConfig(...))`` on any transformers causal LM.

PEFT 0.21 has no registry for a new kind of config (its ``PeftType`` is a closed enum), but it has two extension
points that together carry HypLoRA without a fork:

- a *LoRA variant* (``LoraVariant``, as DoRA is one): a config field marked ``is_lora_variant`` (``hyplora``) selects
  :class:`HypLoraVariant` in a layer, which replaces the forward and refuses every merge;
- a *custom module mapping* (``LoraConfig._register_custom_module``): :class:`HypLoraConfig` maps ``nn.Linear`` and
  GPT-2's ``Conv1D`` to :class:`HypLoraLinear`, a ``lora.Linear`` whose variant table knows HypLoRA and whose adapter
  parameters include the curvature and the input scale.

So the adapter is ordinary PEFT LoRA in every other respect (``save_pretrained``, ``set_adapter``, ``disable_adapter``,
several adapters, ``adapter_names=`` mixed batches, which run HypLoRA through the variant). The curvature ``K`` and
the input scale ``rho`` are adapter parameters when learnable (``lora_curvature``: ``K = softplus(raw) + 1e-6``;
``lora_input_scale``: ``log rho``; both fp32): saved in ``adapter_model.safetensors``, moved by ``.to()``, switched by
``set_adapter``. When fixed they are plain numbers of the config, not parameters, so nothing can train them.

Reloading: ``adapter_config.json`` says ``"peft_type": "LORA"``, which stock PEFT would read as a plain ``LoraConfig``
(warning about the unknown keys) and run as Euclidean LoRA. Load with :func:`helmlm.peft.load_adapter`, or pass
``config=HypLoraConfig.from_pretrained(path)`` to ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraVariant
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from helmlm.errors import HypLoraMergeError
from helmlm.peft.functional import VARIANTS, curvature_from_raw, hyplora_delta, raw_from_curvature


MERGE_MESSAGE = ("a HypLoRA adapter cannot be merged into the base weight: its update "
                 "sqrt(K) asinh(|z| / sqrt(K)) z / |z| (z = B A expmap0(x / rho)) is not linear in x, so no matrix "
                 "reproduces it. Keep the adapter unmerged (PeftModel works as is, and save_pretrained saves only "
                 "the adapter).")


@dataclass
class HypLoraConfig(LoraConfig):
    """A ``LoraConfig`` for HypLoRA (MATH.md section 7).

    ``hyplora_variant``: ``"paper"`` or ``"readme"`` (see :mod:`helmlm.peft.functional`). ``curvature``: the initial
    ``K`` of the hyperboloid ``<x, x>_L = -K`` (the public code starts at ``softplus(1.0) = 1.313``).
    ``input_scale``: the initial divisor ``rho`` of the input (``None``: ``sqrt(d_in)`` of each layer, as the public
    code). ``learn_curvature`` / ``learn_input_scale``: train them (each layer has its own).
    """

    hyplora: bool = field(default=True, metadata={"is_lora_variant": True,
                                                  "help": "Use HypLoRA (always true for this config)."})
    hyplora_variant: str = field(default="paper", metadata={"help": f"One of {VARIANTS}."})
    curvature: float = field(default=1.0, metadata={"help": "Initial K > 0 of <x, x>_L = -K."})
    learn_curvature: bool = field(default=True, metadata={"help": "Train K (softplus-parametrised, fp32)."})
    input_scale: float | None = field(default=None, metadata={"help": "Initial input divisor; None: sqrt(d_in)."})
    learn_input_scale: bool = field(default=True, metadata={"help": "Train the input scale (in log space)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hyplora:
            raise ValueError("HypLoraConfig(hyplora=False) is a plain LoRA: use peft.LoraConfig for that")
        if self.hyplora_variant not in VARIANTS:
            raise ValueError(f"hyplora_variant must be one of {VARIANTS}, got {self.hyplora_variant!r}")
        if not isinstance(self.curvature, (int, float)) or not self.curvature > 1e-6:
            raise ValueError(f"curvature must be a number > 1e-6, got {self.curvature!r}")
        if self.input_scale is not None and not (isinstance(self.input_scale, (int, float)) and self.input_scale > 0):
            raise ValueError(f"input_scale must be a number > 0 or None, got {self.input_scale!r}")
        if self.lora_bias:
            raise ValueError("HypLoRA has no lora_bias: its B acts inside the hyperboloid, before the log map")
        self._register_custom_module({nn.Linear: HypLoraLinear, Conv1D: HypLoraLinear})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "HypLoraConfig":
        """Build this class whatever ``peft_type`` says (``LORA``): PEFT's own lookup would give a ``LoraConfig``."""
        return cls(**kwargs)


@dataclass(frozen=True)
class HypLoraSettings:
    """An adapter's fixed choices: the variant, and the curvature and input scale where they are not learned."""

    variant: str
    curvature: float | None  # None: learned (lora_curvature)
    input_scale: float | None  # None: learned (lora_input_scale)


class HypLoraVariant(LoraVariant):
    """The HypLoRA forward of a :class:`HypLoraLinear`, and refusals for every merge."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: "HypLoraLinear", adapter_name: str, config: HypLoraConfig | None = None, **kwargs: Any) -> None:
        module.init_hyplora(adapter_name, config)

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        raise HypLoraMergeError(MERGE_MESSAGE)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight):
        raise HypLoraMergeError(MERGE_MESSAGE)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        raise HypLoraMergeError(MERGE_MESSAGE)

    @staticmethod
    def forward(module: "HypLoraLinear", active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any) -> Tensor:
        delta = module.hyplora_delta(active_adapter, x)
        return result + (module.scaling[active_adapter] * delta).to(result.dtype)


class HypLoraLinear(lora_layer.Linear):
    """PEFT's ``lora.Linear`` (over ``nn.Linear`` or ``Conv1D``) with HypLoRA as a LoRA variant; see the module
    docstring. :meth:`hyplora_delta` is the adapter's output before the ``alpha / r`` scaling."""

    adapter_layer_names = lora_layer.Linear.adapter_layer_names + ("lora_curvature", "lora_input_scale")
    other_param_names = lora_layer.Linear.other_param_names + ("hyplora_settings",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HypLoraConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, lora_layer.LoraLayer) else base_layer
        is_conv1d = isinstance(base, Conv1D)
        super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs)
        self.fan_in_fan_out = is_conv1d  # Conv1D stores its weight (in, out); only merging would read this

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        if "lora_curvature" not in self._modules:  # first adapter: LoRA's __init__ has just reset the module
            self.lora_curvature, self.lora_input_scale = nn.ParameterDict(), nn.ParameterDict()
            self.hyplora_settings: dict[str, HypLoraSettings] = {}
        super().update_layer(adapter_name, *args, **kwargs)

    @property
    def lora_variants(self) -> dict[tuple[str, ...], type[LoraVariant] | None]:
        return {(): None, ("hyplora",): HypLoraVariant}

    def init_hyplora(self, adapter_name: str, config: HypLoraConfig) -> None:
        """Shape the low-rank weights for the variant and create the curvature and input scale of ``adapter_name``."""
        variant, r = config.hyplora_variant, self.r[adapter_name]
        A, B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if variant == "readme":  # A sees the time coordinate too, and B the recomputed time of A's output
            wide_A = nn.Linear(self.in_features + 1, r, bias=False, device=A.weight.device, dtype=A.weight.dtype)
            wide_B = nn.Linear(r + 1, self.out_features, bias=False, device=B.weight.device, dtype=B.weight.dtype)
            if config.init_lora_weights:  # PEFT's default: A Kaiming-uniform (nn.Linear's init), B zero
                nn.init.zeros_(wide_B.weight)
            self.lora_A[adapter_name], self.lora_B[adapter_name] = wide_A, wide_B
        scale = config.input_scale if config.input_scale is not None else math.sqrt(self.in_features)
        device = A.weight.device
        if config.learn_curvature:
            self.lora_curvature[adapter_name] = nn.Parameter(
                torch.tensor(raw_from_curvature(config.curvature), dtype=torch.float32, device=device))
        if config.learn_input_scale:
            self.lora_input_scale[adapter_name] = nn.Parameter(
                torch.tensor(math.log(scale), dtype=torch.float32, device=device))
        self.hyplora_settings[adapter_name] = HypLoraSettings(
            variant, None if config.learn_curvature else float(config.curvature),
            None if config.learn_input_scale else float(scale))
        self.set_adapter(self.active_adapters)  # the new parameters train only while their adapter is active

    def curvature(self, adapter_name: str) -> Tensor | float:
        """``K`` of ``adapter_name``: a fp32 tensor when learned, else the config's number."""
        fixed = self.hyplora_settings[adapter_name].curvature
        return curvature_from_raw(self.lora_curvature[adapter_name]) if fixed is None else fixed

    def input_scale(self, adapter_name: str) -> Tensor | float:
        """``rho`` of ``adapter_name``: ``exp`` of the learned log scale, or the fixed number."""
        fixed = self.hyplora_settings[adapter_name].input_scale
        return self.lora_input_scale[adapter_name].float().exp() if fixed is None else fixed

    def hyplora_delta(self, adapter_name: str, x: Tensor) -> Tensor:
        """The adapter's output for ``x`` (dropout applied), before the ``alpha / r`` scaling, in fp32 at least."""
        return hyplora_delta(self.lora_dropout[adapter_name](x), self.lora_A[adapter_name].weight,
                             self.lora_B[adapter_name].weight, self.curvature(adapter_name),
                             self.input_scale(adapter_name), self.hyplora_settings[adapter_name].variant)

    def get_delta_weight(self, adapter: str) -> Tensor:
        raise HypLoraMergeError(MERGE_MESSAGE)

    def __repr__(self) -> str:
        return "hyplora." + super().__repr__().removeprefix("lora.")
