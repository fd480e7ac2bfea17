"""The Lightning module: one LoRA backpropagation step (train/step.py), timed or memory-traced, never both.

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
from sweepbp.measure.timing import StepTimer
from sweepbp.measure.tracker import MemoryReport
from sweepbp.memory import AppliedMemory
from sweepbp.train.data import token_counts
from sweepbp.train.scopes import naming_modules
from sweepbp.train.step import Diverged, counting_gradients, make_optimizer, step_tracker, train_step


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
