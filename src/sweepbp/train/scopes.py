"""Names in a memory snapshot (snapshot=true): which module allocates, and what the state before the step is.

`ModuleScopes` follows the module that runs, in the forward and in the backward, with hooks that exist
during the traced step only. Forward: a stack, pushed and popped by each module's forward pre- and
post-hooks. Backward (as torch.utils.module_tracker.ModuleTracker does it): a module's backward begins
when the gradient of one of its outputs is ready and ends when the gradient of one of its inputs is,
seen by plain tensor hooks that keep no gradient (ModuleTracker's multi-grad hooks buffer gradients until
all have arrived, which could move the peak). Checkpointing recomputes a layer inside the backward by
calling its forward again, so the forward stack names the recompute after the layer, as it should.

Modules are named by their path in the Hugging Face model (`model.layers.7.mlp.down_proj`), without
peft's `base_model.model.` wrapper; the adapter's own modules keep peft's names (`...down_proj.lora_A.default`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._pytree import tree_flatten

from sweepbp.measure.snapshot import SnapshotLog
from sweepbp.measure.tracker import MemoryTracker, storage_key, tensors_of

NOWHERE = "-"  # outside every module of the model (the loss, the optimizer)


class ModuleScopes:
    """The module running now (`current`), while entered."""

    def __init__(self, model: torch.nn.Module):
        self.names = {module: name for name, module in hf_model(model).named_modules() if name}
        self._forward: list[str] = []
        self._backward: dict[str, None] = {}  # open backward scopes, the most recently entered last
        self._handles: list = []
        self._reset_queued = False

    def current(self) -> str:
        if self._forward:
            return self._forward[-1]
        return next(reversed(self._backward)) if self._backward else NOWHERE

    def __enter__(self) -> "ModuleScopes":
        for module in self.names:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        name = self.names[module]
        self._forward.append(name)
        self._hook_tensors((args, kwargs), lambda _grad: self._leave_backward(name))

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        name = self.names[module]
        if name in self._forward:
            del self._forward[len(self._forward) - 1 - self._forward[::-1].index(name)]
        self._hook_tensors(output, lambda _grad: self._enter_backward(name))

    def _hook_tensors(self, values: object, hook) -> None:
        for value in tree_flatten(values)[0]:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                self._handles.append(value.register_hook(hook))

    def _enter_backward(self, name: str) -> None:
        if not self._reset_queued:  # the backward set empties when this backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self._reset)
            self._reset_queued = True
        self._backward.pop(name, None)
        self._backward[name] = None

    def _leave_backward(self, name: str) -> None:
        self._backward.pop(name, None)

    def _reset(self) -> None:
        self._backward.clear()
        self._reset_queued = False


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside peft's wrapper (the model itself for method=full)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def state_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict | list) -> dict[int, str]:
    """Names of what exists before the step, by storage: weights and buffers by their path, optimizer state
    as `<parameter>.<state>` (`...lora_A.default.weight.exp_avg`), the batch as `batch.<key>` (a dataset's
    micro-batches as `batch.<i>.<key>`)."""
    root = hf_model(model)
    names: dict[int, str] = {}
    for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
        names.setdefault(storage_key(tensor), name)
    if optimizer is not None:
        by_param = {param: name for name, param in root.named_parameters()}
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    names.setdefault(storage_key(value), f"{by_param.get(param, NOWHERE)}.{key}")
    # a step's batch: one dict, or a dataset's micro-batches (a list of dicts) under accumulation
    parts = batch if isinstance(batch, list) else [batch]
    for index, part in enumerate(parts):
        prefix = f"batch.{index}." if len(parts) > 1 else "batch."
        for key, tensor in part.items():
            for piece in tensors_of(tensor):
                names.setdefault(storage_key(piece), f"{prefix}{key}")
    return names


@contextlib.contextmanager
def naming_modules(model: torch.nn.Module, tracker: MemoryTracker) -> Iterator[None]:
    """Name the running module in the tracker's snapshot log; nothing (no hook) without one."""
    log: SnapshotLog | None = tracker.log
    if log is None:
        yield
        return
    with ModuleScopes(model) as scopes:
        log.where = scopes.current
        yield
