"""Selective activation checkpointing policies: which operator outputs a checkpointed layer keeps.

A policy sees every aten operator the layer runs in its forward and answers save or recompute
(PyTorch's `create_selective_checkpoint_contexts`). Saved outputs are replayed from the cache in the
backward; everything else is recomputed from the layer input. Names are `memory.policy` values,
listed in config.SELECTIVE_POLICIES so the config can be validated without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy

aten = torch.ops.aten

# Attention: the fused kernels (CPU and CUDA variants), and the softmax probabilities of eager attention
# (the only softmax inside a decoder layer). Quadratic in sequence length, worth keeping.
ATTENTION_OPS = frozenset({
    aten._softmax.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_fused_attention_overrideable.default,
})
# Matrix multiplications, with the position of their first matrix operand (its last dim is the reduction).
MATMUL_OPS = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}

Policy = Callable[..., CheckpointPolicy]


def adapter_rank(model: torch.nn.Module) -> int:
    """The largest LoRA rank in the model (0 without adapters)."""
    ranks: list[int] = []
    for module in model.modules():
        per_adapter = getattr(module, "r", None)  # peft LoraLayer: adapter name -> rank
        if isinstance(per_adapter, dict):
            ranks.extend(per_adapter.values())
    return max(ranks, default=0)


def save_attention(model: torch.nn.Module) -> Policy:
    """Keep attention outputs only; recompute projections, norms, activations and adapters."""

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def save_matmuls(model: torch.nn.Module) -> Policy:
    """Keep attention and full-rank matmul outputs; recompute norms, activations, rotary embeddings and
    the adapters' rank-r up-projections (a matmul reducing over <= the LoRA rank is cheap to redo)."""
    rank = adapter_rank(model)

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        operand = MATMUL_OPS.get(op)
        if operand is not None and args[operand].shape[-1] > rank:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


POLICIES: dict[str, Callable[[torch.nn.Module], Policy]] = {
    "save_matmuls": save_matmuls,
    "save_attention": save_attention,
}


def selective_policy(name: str, model: torch.nn.Module) -> Policy:
    """The policy function named by `memory.policy`, specialised to the model."""
    return POLICIES[name](model)
