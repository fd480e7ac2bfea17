"""Step timing: wall-clock phases with the device synchronised before every clock read (their statistics:
measure/stats.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class StepTimer:
    """Wall-clock phases of one step, with the device synchronised before every clock read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.phases.values())
