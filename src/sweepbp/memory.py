"""Memory strategies: how activations are kept for the backward pass.

Each strategy is one function in `STRATEGIES`, keyed by `memory.name`, that changes the model in place
and returns what the training step needs to know. Adding a strategy = one schema in config.py, one YAML
in conf/memory/, one function here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from sweepbp.config import MemoryConfig
from sweepbp.measure import layer_scope


@dataclass
class AppliedMemory:
    """A strategy as applied to one model."""

    name: str
    checkpointed_layers: int = 0
    forward_context: Callable[[], AbstractContextManager[None]] = field(default=contextlib.nullcontext)


def decoder_layers(model: torch.nn.Module) -> list[GradientCheckpointingLayer]:
    """The repeated decoder blocks, in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed(function, *args, checkpoint_kwargs: dict):
    """Non-reentrant checkpoint of one layer; the layer body is marked so recompute counts as activations."""

    def scoped(*inner_args, **inner_kwargs):
        with layer_scope():
            return function(*inner_args, **inner_kwargs)

    return checkpoint(scoped, *args, use_reentrant=False, **checkpoint_kwargs)


def checkpoint_layers(model: torch.nn.Module, every: int, **checkpoint_kwargs) -> int:
    """Checkpoint every `every`-th decoder layer through HF's per-layer hook; returns how many."""
    layers = decoder_layers(model)
    func = functools.partial(_checkpointed, checkpoint_kwargs=checkpoint_kwargs)
    count = 0
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
        layer._gradient_checkpointing_func = func
        count += int(layer.gradient_checkpointing)
    return count


def _none(model: torch.nn.Module, memory: MemoryConfig, device: torch.device) -> AppliedMemory:
    return AppliedMemory(name="none")


def _ckpt(model: torch.nn.Module, memory: MemoryConfig, device: torch.device) -> AppliedMemory:
    return AppliedMemory(name="ckpt", checkpointed_layers=checkpoint_layers(model, memory.every))


STRATEGIES: dict[str, Callable[[torch.nn.Module, MemoryConfig, torch.device], AppliedMemory]] = {
    "none": _none,
    "ckpt": _ckpt,
}


def apply_memory_strategy(model: torch.nn.Module, memory: MemoryConfig, device: torch.device) -> AppliedMemory:
    """Apply `memory.name` to the model. The model must then train in training mode (HF skips
    checkpointing in eval mode), which `assert_training_mode` checks."""
    return STRATEGIES[memory.name](model, memory, device)


def assert_training_mode(model: torch.nn.Module) -> None:
    """Checkpointing silently does nothing on modules in eval mode (PITFALLS: Lightning #20105)."""
    stale = [name for name, mod in model.named_modules() if not mod.training]
    if stale:
        raise RuntimeError(f"modules left in eval mode would disable checkpointing: {stale[:3]}")
