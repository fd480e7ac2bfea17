"""Memory strategies: how activations are kept for the backward pass.

Each strategy is one function in `STRATEGIES`, keyed by `memory.name`, that changes the model in place
and returns what the training step needs to know. Adding a strategy = one schema in config/schema.py, one YAML
in conf/memory/, one function here. The mechanisms live beside it: checkpointing of decoder layers in checkpoint.py,
selective-checkpointing policies in selective.py, the offloading hooks in offload.py;
docs/memory-strategies.md says when to pick which.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from sweepbp.config import CkptOffloadMemoryConfig, MemoryConfig, OffloadMemoryConfig, SelectiveMemoryConfig
from sweepbp.memory.checkpoint import checkpoint_layers
from sweepbp.memory.offload import HostOffload
from sweepbp.memory.selective import selective_policy


@dataclass
class AppliedMemory:
    """A strategy as applied to one model."""

    name: str
    checkpointed_layers: int = 0
    forward_context: Callable[[], AbstractContextManager[None]] = field(default=contextlib.nullcontext)
    offload: HostOffload | None = None  # offloading strategies: the hooks and what they moved


def _none(model: torch.nn.Module, memory: MemoryConfig, device: torch.device) -> AppliedMemory:
    return AppliedMemory(name="none")


def _ckpt(model: torch.nn.Module, memory: MemoryConfig, device: torch.device) -> AppliedMemory:
    return AppliedMemory(name="ckpt", checkpointed_layers=checkpoint_layers(model, memory.every))


def _selective(model: torch.nn.Module, memory: SelectiveMemoryConfig, device: torch.device) -> AppliedMemory:
    """Checkpoint layers, but replay the outputs `memory.policy` saves instead of recomputing them."""
    policy = selective_policy(memory.policy, model)
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    count = checkpoint_layers(model, memory.every, context_fn=context_fn)
    return AppliedMemory(name="selective", checkpointed_layers=count)


def _offload(model: torch.nn.Module, memory: OffloadMemoryConfig, device: torch.device) -> AppliedMemory:
    """Every saved activation of the forward goes to host memory."""
    offload = HostOffload(model, device, memory.min_bytes)
    return AppliedMemory(name="offload", forward_context=offload.offloading, offload=offload)


def _ckpt_offload(model: torch.nn.Module, memory: CkptOffloadMemoryConfig, device: torch.device) -> AppliedMemory:
    """Checkpoint layers; the offload hooks wrap each checkpoint call, so only layer inputs go to the host."""
    offload = HostOffload(model, device, memory.min_bytes)
    count = checkpoint_layers(model, memory.every, around=offload.hooks)
    return AppliedMemory(name="ckpt_offload", checkpointed_layers=count, forward_context=offload.session,
                         offload=offload)


STRATEGIES: dict[str, Callable[[torch.nn.Module, MemoryConfig, torch.device], AppliedMemory]] = {
    "none": _none,
    "ckpt": _ckpt,
    "selective": _selective,
    "offload": _offload,
    "ckpt_offload": _ckpt_offload,
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
