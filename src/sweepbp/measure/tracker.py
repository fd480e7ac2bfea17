"""The exact memory tracker: tensor-level accounting by category, the same for real and data-less tensors.

`MemoryTracker` is a TorchDispatchMode. Every tensor an operator returns is looked at once: a storage
not seen before is counted with its exact byte size and given a category, and a finalizer on the
storage subtracts it when PyTorch frees it. Storages that exist before tracking starts (weights,
adapter, optimizer state, the batch) are registered explicitly. The same code counts real CPU or CUDA
tensors and fake tensors (mode=predict), so a prediction is the same accounting as a measurement.

What it cannot see: scratch memory inside one kernel (e.g. cuBLAS workspaces) and allocator rounding;
on CUDA the allocator's own peaks are reported beside it for that reason (measure/device.py).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sweepbp.config import GB
from sweepbp.measure.snapshot import SnapshotLog

# Categories of device memory, in the order they claim a storage that fits several.
PARAM, QUANT_STATE, TRAINABLE, GRAD, OPTIMIZER, ACTIVATION, LOGITS, OTHER = (
    "param", "quant_state", "trainable", "grad", "optimizer_state", "activation", "logits", "other")
CATEGORIES = (PARAM, QUANT_STATE, TRAINABLE, GRAD, OPTIMIZER, ACTIVATION, LOGITS, OTHER)
HOST = "host"  # memory an offloading strategy keeps off the device
# The step's phases. LOSS is the output projection and the loss, from the forward's hidden states to the
# loss and, at the start of the backward, back to their gradient: what it allocates is LOGITS.
FORWARD, LOSS, BACKWARD, OPTIM = "forward", "loss", "backward", "optim"
# Before the step (what is registered) and between its phases: the tracker's phase outside every `phase_of`.
SETUP = "setup"

_active: list["MemoryTracker"] = []


def active_tracker() -> "MemoryTracker | None":
    """The tracker counting right now, if any (strategies use it to mark recompute and offload)."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def layer_scope() -> Iterator[None]:
    """Mark a decoder layer's body: allocations here during the backward are recomputed activations."""
    tracker = active_tracker()
    if tracker is None:
        yield
        return
    tracker._layer_depth += 1
    try:
        yield
    finally:
        tracker._layer_depth -= 1


@contextlib.contextmanager
def host_scope() -> Iterator[None]:
    """Mark copies made by an offloading strategy: counted as host memory, not device memory."""
    tracker = active_tracker()
    if tracker is None:
        yield
        return
    tracker._host_depth += 1
    try:
        yield
    finally:
        tracker._host_depth -= 1


def enter_phase(name: str) -> None:
    """Switch the active tracker to phase `name` from inside the step; no-op without a tracker. The loss
    marks its own phase this way: it begins inside the forward, and the backward that follows starts in it
    (the loss's gradient comes first) until the loss switches to BACKWARD at the hidden states' gradient."""
    tracker = active_tracker()
    if tracker is not None:
        tracker.switch_phase(name)
        tracker._loss_open = name == LOSS


@dataclass
class MemorySample:
    """Live bytes per category at one moment (used for the timeline chart)."""

    phase: str
    by_category: dict[str, int]
    host: int

    def as_dict(self) -> dict:
        """JSON-ready (what `dataclasses.asdict` gives, without its deep copy: thousands per traced step)."""
        return {"phase": self.phase, "by_category": dict(self.by_category), "host": self.host}


@dataclass
class PhasePeak:
    """The same figures as a report, within one phase of the step (every stretch of time spent in it).

    The step's own figures are the largest of its phases' (`MemoryReport.phases`): depth extrapolation
    (predict/depth.py) extrapolates each phase on its own, since the phase holding the peak can change with depth.
    """

    peak_bytes: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)
    category_peaks: dict[str, int] = field(default_factory=dict)
    host_peak_bytes: int = 0
    first_event: int = 0  # the tracker's event count when the phase first reached its peak (breaks ties in time)
    entry_bytes: int = 0  # live bytes when the phase was entered (the largest, if entered more than once)
    exit_bytes: int = 0  # live bytes when it was left (likewise)

    def note_category(self, category: str, live: int) -> None:
        if live > self.category_peaks.get(category, 0):
            self.category_peaks[category] = live

    def note(self, total: int, live: dict[str, int], event: int) -> None:
        """A moment of the phase with `total` live bytes: its peak if the highest so far."""
        if total > self.peak_bytes:
            self.peak_bytes, self.at_peak, self.first_event = total, dict(live), event


@dataclass
class MemoryReport:
    """What a tracked region allocated: total peak, per-category split at that peak, per-category peaks."""

    peak_bytes: int
    at_peak: dict[str, int]
    category_peaks: dict[str, int]
    host_peak_bytes: int
    start_bytes: int
    timeline: list[MemorySample] = field(default_factory=list)
    phases: dict[str, PhasePeak] = field(default_factory=dict)  # the same figures per phase

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}peak_memory_bytes": self.peak_bytes,
            f"{prefix}param_bytes": self.at_peak[PARAM],
            f"{prefix}quant_state_bytes": self.at_peak[QUANT_STATE],
            f"{prefix}trainable_param_bytes": self.at_peak[TRAINABLE],
            f"{prefix}grad_bytes": self.category_peaks[GRAD],
            f"{prefix}optimizer_state_bytes": self.category_peaks[OPTIMIZER],
            f"{prefix}activation_bytes": self.category_peaks[ACTIVATION],
            f"{prefix}logits_bytes": self.category_peaks[LOGITS],
            f"{prefix}other_bytes": self.at_peak[OTHER],
            f"{prefix}host_offload_bytes": self.host_peak_bytes,
        }


class MemoryTracker(TorchDispatchMode):
    """Counts every storage created while active; optionally raises OOM past a byte budget.

    `device_type` is the device whose memory is counted (cpu or cuda); storages elsewhere (the host,
    for offloading on CUDA) count as host memory. mode=predict passes several types: its trace runs on
    `meta` tensors, next to the real CPU scalars an optimizer keeps (device memory when predicting for CPU).
    With a `log` (snapshot=true) every device allocation and free is also written down, in order, for a
    memory snapshot (measure/snapshot.py).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """PyTorch wraps a mode's `__torch_dispatch__` so that Dynamo skips it if the code under the mode is compiled:
        a few percent of a prediction, whose every op goes through it (twice in `MetaTracker`). Nothing under a
        tracker is compiled (sweepbp compiles nothing; attention is eager or sdpa), so the wrapper is left out."""
        return False

    def __init__(self, device_type: str | tuple[str, ...], budget_bytes: int | None = None,
                 keep_timeline: bool = False, log: SnapshotLog | None = None):
        super().__init__()
        self.log = log  # snapshot=true: every device allocation and free, for a memory snapshot
        self.device_types = (device_type,) if isinstance(device_type, str) else tuple(device_type)
        self.device_type = self.device_types[0]
        self.budget_bytes = budget_bytes
        self.keep_timeline = keep_timeline
        self.phase = SETUP
        self._sizes: dict[int, tuple[int, str]] = {}  # storage key -> (bytes, category)
        self._live = dict.fromkeys(CATEGORIES, 0)
        self._live[HOST] = 0
        self._total = 0
        self._peak = 0
        self._at_peak = dict(self._live)
        self._category_peaks = dict(self._live)
        self._start = 0
        self._layer_depth = 0
        self._host_depth = 0
        self._loss_open = False  # the forward entered the loss phase; the backward has not left it yet
        self._events = 0  # storages counted so far: the order of moments
        self._phases: dict[str, PhasePeak] = {}
        self.timeline: list[MemorySample] = []
        self._op: object = None  # the operator whose outputs are being counted (named in a snapshot's frames)

    # -- registering what exists before tracking starts ---------------------------------------
    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count already-existing tensors (weights, optimizer state, the batch) under a category."""
        for tensor in tensors:
            self._add(tensor, category)
        self._start = self._total

    def retag(self, tensor: torch.Tensor, category: str) -> None:
        """Move a counted storage to another category (a gradient that landed in `param.grad`)."""
        key = storage_key(tensor)
        entry = self._sizes.get(key)
        if entry is None:
            self._add(tensor, category)
            return
        size, old = entry
        if old == category:
            return
        self._sizes[key] = (size, category)
        if self.log is not None:
            self.log.retag(key, category)
        self._live[old] -= size
        self._live[category] += size
        self._category_peaks[category] = max(self._category_peaks[category], self._live[category])
        self._phase_peak().note_category(category, self._live[category])

    # -- the dispatch hook --------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = func
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, self._category_for_new())
        return out

    def _category_for_new(self) -> str:
        if self._host_depth:
            return HOST
        if self.phase == LOSS:
            return LOGITS
        if self.phase == FORWARD or (self.phase == BACKWARD and self._layer_depth):
            return ACTIVATION
        return OTHER

    def _add(self, tensor: torch.Tensor, category: str) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            return
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        if category != HOST and tensor.device.type not in self.device_types:
            category = HOST
        self._sizes[key] = (size, category)
        weakref.finalize(storage, self._free, key)
        self._live[category] += size
        self._events += 1
        phase = self._phase_peak()
        if category == HOST:
            self._category_peaks[HOST] = max(self._category_peaks[HOST], self._live[HOST])
            phase.host_peak_bytes = max(phase.host_peak_bytes, self._live[HOST])
            return
        if self.log is not None:
            self.log.alloc(key, size, category, self.phase, self._op)
        self._total += size
        self._category_peaks[category] = max(self._category_peaks[category], self._live[category])
        phase.note_category(category, self._live[category])
        phase.note(self._total, self._live, self._events)
        if self._total > self._peak:
            self._peak = self._total
            self._at_peak = dict(self._live)
        if self.keep_timeline:
            self._sample()
        if self.budget_bytes is not None and self._total > self.budget_bytes:
            if self.log is not None:
                self.log.refused(size, self.budget_bytes - (self._total - size))
            raise torch.OutOfMemoryError(
                f"sweepbp budget: {self._total} bytes live exceed budget_gb={self.budget_bytes / GB:g} "
                f"while allocating {size} bytes in the {self.phase} phase")

    def _free(self, key: int) -> None:
        size, category = self._sizes.pop(key)
        self._live[category] -= size
        if category != HOST:
            self._total -= size
            if self.log is not None:
                self.log.free(key)
            if self.keep_timeline:
                self._sample()

    def _phase_peak(self) -> PhasePeak:
        phase = self._phases.get(self.phase)
        if phase is None:
            phase = self._phases[self.phase] = PhasePeak()
        return phase

    def _sample(self) -> None:
        self.timeline.append(MemorySample(self.phase, {c: self._live[c] for c in CATEGORIES}, self._live[HOST]))

    # -- phases and results -------------------------------------------------------------------
    @contextlib.contextmanager
    def phase_of(self, name: str) -> Iterator[None]:
        if name == BACKWARD and self._loss_open:
            name = LOSS  # the backward begins with the loss's own (see `enter_phase`)
        previous = self.phase
        self.switch_phase(name)
        try:
            yield
        finally:
            self.switch_phase(previous)

    def switch_phase(self, name: str) -> None:
        """Leave the current phase for `name`. The live bytes at that moment are the left phase's exit and the
        entered phase's entry, a moment of it like any other (its peak when nothing is allocated in it). SETUP is
        not a phase of the step: going back to it between phases is no moment of its own."""
        if name == self.phase:
            return
        if self.phase != SETUP:
            left = self._phase_peak()
            left.exit_bytes = max(left.exit_bytes, self._total)
        self.phase = name
        if name != SETUP:
            entered = self._phase_peak()
            entered.entry_bytes = max(entered.entry_bytes, self._total)
            entered.note(self._total, self._live, self._events)

    @property
    def live_bytes(self) -> int:
        return self._total

    def report(self) -> MemoryReport:
        at_peak = {c: self._at_peak[c] for c in CATEGORIES}
        peaks = {c: self._category_peaks[c] for c in CATEGORIES}
        phases = {name: PhasePeak(p.peak_bytes, {c: p.at_peak.get(c, 0) for c in CATEGORIES},
                                  {c: p.category_peaks.get(c, 0) for c in CATEGORIES}, p.host_peak_bytes, p.first_event,
                                  p.entry_bytes, p.exit_bytes)
                  for name, p in self._phases.items()}
        return MemoryReport(self._peak, at_peak, peaks, self._category_peaks[HOST], self._start, list(self.timeline),
                            phases)

    def __enter__(self):
        _active.append(self)
        self._peak = max(self._peak, self._total)
        if self.log is not None:
            self.log.start()
        return super().__enter__()

    def __exit__(self, *exc):
        _active.remove(self)
        if self.log is not None:
            self.log.stop()
        return super().__exit__(*exc)


def timeline_samples(report: MemoryReport, most: int = 2000) -> list[dict]:
    """The report's timeline as JSON-ready samples, at most about `most` of them. A long timeline is thinned
    by buckets of consecutive samples, each keeping its highest and its lowest (in order), so the drawn
    peak is the step's peak and the dips between phases stay visible (every n-th sample would miss both)."""
    timeline = report.timeline
    if len(timeline) <= most:
        return [s.as_dict() for s in timeline]
    width = -(-2 * len(timeline) // most)  # ceil: two kept per bucket
    kept: list[MemorySample] = []
    for start in range(0, len(timeline), width):
        bucket = timeline[start:start + width]
        totals = [sum(s.by_category.values()) for s in bucket]
        high, low = totals.index(max(totals)), totals.index(min(totals))
        kept += [bucket[i] for i in sorted({low, high})]
    return [s.as_dict() for s in kept]


def storage_key(tensor: torch.Tensor) -> int:
    """The identity the tracker counts a storage by (views of one storage share it)."""
    return tensor.untyped_storage()._cdata


def tensors_of(obj: object) -> list[torch.Tensor]:
    """Every tensor inside a nested structure (optimizer state, a batch dict)."""
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]
