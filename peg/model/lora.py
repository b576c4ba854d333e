"""LoRA adapters on the encoder's transformer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"; the `peft` library, optional extra `peg[lora]`).

`apply_lora(encoder, settings)` wraps `encoder.model` in a `peft.PeftModel`: every target module's
weight W gets a trainable low-rank update (alpha / r) B A (B starts at zero, so the wrapped model
computes exactly what the base model did); everything else is frozen, so the optimizer (which
takes the parameters that require gradients) trains only A and B. The PeftModel's forward is the
base model's, so pooling, GradCache and DeepSpeed see an ordinary module.

`merged_copy(model, state_dict)` is what export writes: a CPU float32 copy with every update
merged into its weight (W + (alpha / r) B A), a plain transformers model any reader loads.
Exporting the adapter alone is not offered: transformers 5.24 loads adapters only with
peft >= 0.22, and the newest peft installable here is 0.21.2.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from peg.errors import PegError


class LoraError(PegError, ValueError):
    """LoRA asked for without `peft`, or with settings peft refuses; the message says which."""

    bad_input = True


def apply_lora(encoder: Any, settings: Any) -> None:
    """Wrap `encoder.model` with LoRA adapters per `settings` (`model.lora`: r, alpha, dropout, target_modules)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LoraError("model.lora.enabled needs the peft package: pip install 'peg[lora]'") from None
    lora = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, bias="none",
    )  # fmt: skip
    try:
        encoder.model = get_peft_model(encoder.model, lora)
    except ValueError as e:  # e.g. target modules not found in the model, or no default for its architecture
        raise LoraError(f"model.lora: {e}") from None


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft-wrapped (LoRA) model."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged_copy(model: torch.nn.Module, state_dict: dict | None) -> torch.nn.Module:
    """A CPU float32 copy of the peft `model`, loaded with `state_dict` (if given; e.g. the weights
    gathered under ZeRO-3), with the adapters merged: a plain transformers model."""
    clone = copy.deepcopy(model).to("cpu", torch.float32)
    if state_dict is not None:
        clone.load_state_dict(state_dict)
    return clone.merge_and_unload()
