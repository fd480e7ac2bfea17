"""Putting a LoRA adapter (peft) on the frozen base model."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from sweepbp.config import ConfigError, LoraConfig


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Short names of the model's linear layers (what `target_modules` may name)."""
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def apply_lora(model: torch.nn.Module, lora: LoraConfig) -> PeftModel:
    """Freeze the base model and add trainable low-rank adapters to the target layers."""
    available = linear_module_names(model)
    unknown = sorted(set(lora.target_modules) - available)
    if unknown:
        raise ConfigError([f"lora.target_modules must name linear layers of the model ({', '.join(sorted(available))}), "
                           f"got {unknown}"])
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)
