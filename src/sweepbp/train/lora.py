"""What trains: a LoRA or DoRA adapter (peft) on the frozen base model, or every weight (`method.name`)."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from sweepbp.config import ALL_LINEAR, ConfigError, LoraConfig, MethodConfig


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Short names of the model's linear layers (what `target_modules` may name)."""
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def apply_method(model: torch.nn.Module, method: MethodConfig, lora: LoraConfig) -> torch.nn.Module:
    """The model as `method.name` trains it: with a LoRA or DoRA adapter, or whole (method=full)."""
    if method.name == "full":
        model.requires_grad_(True)
        return model
    return apply_lora(model, lora, dora=method.name == "dora")


def apply_lora(model: torch.nn.Module, lora: LoraConfig, dora: bool = False) -> PeftModel:
    """Freeze the base model and add trainable low-rank adapters to the target layers. With
    `lora.adapter_dtype=float32` peft keeps the adapters of a 16-bit model in fp32 (its default)."""
    available = linear_module_names(model)
    everything = lora.target_modules == [ALL_LINEAR]
    unknown = [] if everything else sorted(set(lora.target_modules) - available)
    if unknown:
        raise ConfigError([f"lora.target_modules must name linear layers of the model ({', '.join(sorted(available))}), "
                           f"got {unknown}"])
    targets = ALL_LINEAR if everything else list(lora.target_modules)  # peft resolves all-linear per model
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM", use_dora=dora)
    dtype = model.get_input_embeddings().weight.dtype  # the model's dtype (quantised linears have none)
    adapted = get_peft_model(model, peft_config, autocast_adapter_dtype=lora.adapter_dtype == "float32")
    if lora.adapter_dtype == "model":  # peft leaves adapters made on `meta` (mode=predict) in fp32: cast them
        for param in adapted.parameters():
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return adapted


def adapted_layer_names(model: torch.nn.Module) -> list[str]:
    """The short names of the layers that carry an adapter (what `lora.target_modules` resolved to)."""
    config = getattr(model, "peft_config", {}).get("default")
    return sorted({name.rsplit(".", 1)[-1] for name in config.target_modules}) if config is not None else []
