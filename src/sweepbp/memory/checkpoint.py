"""Activation checkpointing of decoder layers: non-reentrant, through Hugging Face's per-layer hook, with the
layer body marked so that its recompute in the backward counts as activations."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from sweepbp.measure.tracker import layer_scope


def decoder_layers(model: torch.nn.Module) -> list[GradientCheckpointingLayer]:
    """The repeated decoder blocks, in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed(function, *args, checkpoint_kwargs: dict,
                  around: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext):
    """Non-reentrant checkpoint of one layer; the layer body is marked so recompute counts as activations.

    `around` wraps the checkpoint call itself: saved-tensor hooks entered there see only what the
    checkpoint saves through autograd, i.e. the layer's inputs (ckpt_offload relies on this)."""

    def scoped(*inner_args, **inner_kwargs):
        with layer_scope():
            return function(*inner_args, **inner_kwargs)

    with around():
        return checkpoint(scoped, *args, use_reentrant=False, **checkpoint_kwargs)


def checkpoint_layers(model: torch.nn.Module, every: int,
                      around: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
                      **checkpoint_kwargs) -> int:
    """Checkpoint every `every`-th decoder layer through HF's per-layer hook; returns how many."""
    layers = decoder_layers(model)
    func = functools.partial(_checkpointed, checkpoint_kwargs=checkpoint_kwargs, around=around)
    count = 0
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
        layer._gradient_checkpointing_func = func
        count += int(layer.gradient_checkpointing)
    return count
