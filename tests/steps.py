"""Helpers of the tests that run training steps by hand: a tiny adapted model, and an optimizer stand-in
that keeps the adapter gradients."""

from __future__ import annotations

import torch
from conftest import FAST, compose

from sweepbp.memory import apply_memory_strategy
from sweepbp.train.data import TokenBatches
from sweepbp.train.lora import apply_lora
from sweepbp.train.model import build_model

CPU = torch.device("cpu")


def build(overrides: list[str], train: bool = True, device: torch.device = CPU):
    """Tiny model + LoRA + strategy, with every adapter weight non-zero so every adapter gradient is."""
    cfg = compose([*FAST, "tracking=none", *overrides]).cfg
    model = apply_lora(build_model(cfg.model, device, cfg.trainer.seed), cfg.lora)
    with torch.no_grad():  # peft starts lora_B at zero, which makes every lora_A gradient zero
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    applied = apply_memory_strategy(model, cfg.memory, device)
    model.train(train)
    batches = TokenBatches(cfg.data, cfg.trainer.steps, int(cfg.batch.size), cfg.batch.seq_len,
                           model.config.vocab_size, cfg.trainer.seed)
    return model, applied, batches


class KeepGradients:
    """Stands in for the optimizer of `train_step`: its step keeps a copy of the adapter gradients."""

    def __init__(self, model: torch.nn.Module):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.grads: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in self.params.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params.values():
            param.grad = None
