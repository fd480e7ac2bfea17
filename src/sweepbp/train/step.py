"""One training step in plain PyTorch, and its exact memory accounting: the optimizer, the step (forward, loss,
backward, optimizer step), the tracker around it and the inference forward.

A measured job runs it inside Lightning (train/module.py); mode=predict runs it as it is on tensors without
data (predict/trace.py), so a prediction never imports Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from sweepbp.config import LossConfig, OptimConfig
from sweepbp.measure.snapshot import SnapshotLog
from sweepbp.measure.tracker import (
    BACKWARD,
    FORWARD,
    GRAD,
    OPTIM,
    OPTIMIZER,
    OTHER,
    PARAM,
    QUANT_STATE,
    TRAINABLE,
    MemoryTracker,
    active_tracker,
    tensors_of,
)
from sweepbp.memory import AppliedMemory
from sweepbp.train.data import micro_batches
from sweepbp.train.loss import step_loss
from sweepbp.train.quant import quant_state_tensors
from sweepbp.train.scopes import state_names


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float, weight_decay: float,
                   foreach: bool | None = None) -> torch.optim.Optimizer:
    """The `optim.name` optimizer on the trained weights. `foreach=None` is PyTorch's per-device default for
    its own optimizers (mode=predict passes the target device's choice, since its trace runs on fake CPU
    tensors); bitsandbytes' have one implementation."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "adamw":
        return torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay, foreach=foreach)
    if optim.name == "adafactor":
        return torch.optim.Adafactor(trained, lr=lr, weight_decay=weight_decay, foreach=foreach)
    if optim.name == "sgd":
        return torch.optim.SGD(trained, lr=lr, momentum=optim.momentum,  # type: ignore[attr-defined]
                               weight_decay=weight_decay, foreach=foreach)
    import bitsandbytes as bnb  # the `.[quant]` extra, as for quant=nf4 (pre-flight names it)

    kind = bnb.optim.PagedAdamW8bit if optim.name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return kind(trained, lr=lr, weight_decay=weight_decay, min_8bit_size=optim.min_8bit_size)  # type: ignore[attr-defined]


def train_step(model: torch.nn.Module, memory: AppliedMemory, loss_config: LossConfig,
               batch: dict[str, torch.Tensor], optimizer, backward: Callable[[torch.Tensor], None],
               phase: Callable[[str], contextlib.AbstractContextManager]) -> torch.Tensor:
    """One optimizer step: for each micro-batch (one unless `batch.accumulate` > 1) the forward and loss
    (under the strategy's context) and the backward, gradients accumulating; then the optimizer step,
    gradients freed. Returns the step's mean loss. The loss marks its own phase for the tracker
    (train/loss.py), inside the forward and the backward."""
    micro = micro_batches(batch)
    total = None
    for part in micro:
        with phase(FORWARD), memory.forward_context():
            loss = step_loss(model, part, loss_config)
            if len(micro) > 1:
                loss = loss / len(micro)  # the step's gradient is the mean over its micro-batches
        with phase(BACKWARD):
            backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        del loss
    with phase(OPTIM):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


def step_tracker(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict[str, torch.Tensor],
                 device_type: str | tuple[str, ...], budget_bytes: int | None, keep_timeline: bool,
                 kind: type[MemoryTracker] = MemoryTracker, snapshot: bool = False) -> MemoryTracker:
    """The exact tracker of one traced step, with the state that exists before it registered.
    The same tracker counts real tensors (mode=measure) and data-less ones (mode=predict passes its `kind`);
    with `snapshot` it also logs its events for a memory snapshot, the registered state named."""
    log = SnapshotLog(state_names(model, optimizer, batch)) if snapshot else None
    tracker = kind(device_type, budget_bytes, keep_timeline=keep_timeline, log=log)
    register_state(tracker, model, optimizer, batch)
    return tracker


def inference_peak(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss: LossConfig,
                   device_type: str | tuple[str, ...], budget_bytes: int | None = None,
                   kind: type[MemoryTracker] = MemoryTracker) -> int:
    """Peak bytes of a forward pass and its loss without gradients on `batch`: weights, adapter and
    transients, counted by the same exact tracker as the training step (mode=predict passes its data-less
    `kind`)."""
    tracker = step_tracker(model, None, batch, device_type, budget_bytes, False, kind)
    with torch.no_grad(), tracker, tracker.phase_of("inference"):
        step_loss(model, batch, loss)
    return tracker.report().peak_bytes


@contextlib.contextmanager
def counting_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Adapter gradients, once accumulated into `param.grad`, count as gradients rather than temporaries.
    The hooks exist only around the traced step: timed steps run without any tracing hook."""
    handles = [param.register_post_accumulate_grad_hook(_count_as_gradient)
               for param in model.parameters() if param.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def register_state(tracker: MemoryTracker, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   batch: object) -> None:
    """Count what exists before the traced region: weights (and their quantisation state), adapter,
    optimizer state, the batch."""
    tracker.register(quant_state_tensors(model), QUANT_STATE)
    tracker.register([p for p in model.parameters() if p.requires_grad], TRAINABLE)
    tracker.register([p for p in model.parameters() if not p.requires_grad], PARAM)
    tracker.register(list(model.buffers()), PARAM)
    if optimizer is not None:
        tracker.register(tensors_of(list(optimizer.state.values())), OPTIMIZER)
    tracker.register(tensors_of(batch), OTHER)


def _count_as_gradient(param: torch.Tensor) -> None:
    tracker = active_tracker()
    if tracker is not None and param.grad is not None:
        tracker.retag(param.grad, GRAD)

