"""The Lightning module: one LoRA backpropagation step, timed or memory-traced, never both.

Step order: `warmup_steps` untimed steps (the first allocates AdamW state), one memory-traced step
(exact accounting, no timing), then timed steps (synchronised clocks, no tracing hook). With snapshot=true
the traced step also keeps a memory snapshot: the tracker's events on CPU, the allocator's history on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import lightning as L
import torch

from sweepbp.config import LossConfig, OptimConfig
from sweepbp.measure.device import device_peaks, memory_history, record_memory_history, reset_device_peaks
from sweepbp.measure.snapshot import SnapshotLog
from sweepbp.measure.timing import StepTimer
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
    MemoryReport,
    MemoryTracker,
    active_tracker,
    tensors_of,
)
from sweepbp.memory import AppliedMemory
from sweepbp.train.data import micro_batches, token_counts
from sweepbp.train.loss import step_loss
from sweepbp.train.quant import quant_state_tensors
from sweepbp.train.scopes import naming_modules, state_names


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class LoraFinetune(L.LightningModule):
    """The optimizer on the trained weights (an adapter's, or all of them), with manual optimization so each phase
    is visible."""

    def __init__(self, model: torch.nn.Module, memory: AppliedMemory, loss: LossConfig, optim: OptimConfig, lr: float,
                 weight_decay: float, warmup_steps: int, budget_bytes: int | None, keep_timeline: bool = True,
                 on_step: Callable[[int, float, float, int], None] | None = None, snapshot: bool = False):
        super().__init__()
        self.model = model
        self.memory = memory
        self.loss = loss
        self.optim = optim
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps = warmup_steps
        self.traced_step = warmup_steps  # the step right after warm-up is traced, not timed
        self.budget_bytes = budget_bytes
        self.keep_timeline = keep_timeline
        self.on_step = on_step
        self.automatic_optimization = False
        self.losses: list[float] = []
        self.timers: list[StepTimer] = []
        self.timed_counts: list[tuple[int, int, int]] = []  # (real tokens, positions, rows) of each timed step
        self.trace: MemoryReport | None = None
        self.allocator_figures: dict[str, float] = {}  # CUDA allocator peaks of the traced step
        self.steps_time_s = 0.0  # wall time inside all training steps (warm-up, traced, timed): the job's work
        self.snapshot = snapshot
        self.snapshot_data: dict | None = None  # the traced step's memory snapshot (snapshot=true)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.optim, self.lr, self.weight_decay)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        started = time.perf_counter()
        if batch_idx == self.traced_step:
            loss = self._traced_step(batch)
        else:
            timer = StepTimer(self.device)
            with self._allocator_history(batch_idx):
                loss = self._step(batch, timer.phase)
            if batch_idx > self.traced_step:
                self.timers.append(timer)
        value = float(loss.detach())  # waits for the device, so the step's wall time below is complete
        self.steps_time_s += time.perf_counter() - started
        self.losses.append(value)
        counts = token_counts(batch)  # after the clock: padded batches are counted on the device
        if batch_idx > self.traced_step:
            self.timed_counts.append(counts)  # one per timer, also for a step that diverged
        if not math.isfinite(value):
            raise Diverged(f"loss became {value} at step {batch_idx + 1}")
        if self.on_step is not None:  # (step, loss, timed seconds or 0.0 if untimed, real tokens in the step's batch)
            timed = self.timers[-1].total if self.timers and batch_idx > self.traced_step else 0.0
            self.on_step(batch_idx, value, timed, counts[0])

    def _step(self, batch: dict[str, torch.Tensor], phase: Callable[[str], contextlib.AbstractContextManager]) -> torch.Tensor:
        return train_step(self.model, self.memory, self.loss, batch, self.optimizers(), self.manual_backward, phase)

    def _traced_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        tracker = step_tracker(self.model, self.optimizers().optimizer, batch, self.device.type, self.budget_bytes,
                               self.keep_timeline, snapshot=self.snapshot and not cuda)
        reset_device_peaks(self.device)
        try:
            with self._allocator_history(self.traced_step), counting_gradients(self.model), \
                    naming_modules(self.model, tracker), tracker:
                return self._step(batch, tracker.phase_of).detach()
        finally:
            self.trace = tracker.report()  # also when the budget ran out mid-step
            self.allocator_figures = device_peaks(self.device)
            if tracker.log is not None:
                self.snapshot_data = tracker.log.snapshot()

    @contextlib.contextmanager
    def _allocator_history(self, batch_idx: int) -> Iterator[None]:
        """snapshot=true on CUDA: the allocator records each untimed step afresh (warm-up, then the traced
        step), and its snapshot is kept at the end of the traced step, or at an out-of-memory error in any of
        them (up to the refused allocation). The timed steps are never recorded."""
        if not (self.snapshot and self.device.type == "cuda" and batch_idx <= self.traced_step):
            yield
            return
        record_memory_history(self.device)
        try:
            yield
        except torch.OutOfMemoryError:
            self.snapshot_data = memory_history(self.device)
            raise
        if batch_idx == self.traced_step:
            self.snapshot_data = memory_history(self.device)


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

