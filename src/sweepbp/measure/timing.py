"""Step timing: wall-clock phases with the device synchronised before every clock read, and their medians."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass
class TimingSummary:
    """Medians and spread over the timed (post-warm-up, untraced) steps."""

    step_times: list[float]
    fwd_times: list[float]
    bwd_times: list[float]
    optim_times: list[float]

    def metrics(self, tokens_per_step: int, samples_per_step: int) -> dict[str, float]:
        step = statistics.median(self.step_times)
        q1, q3 = _quartiles(self.step_times)
        fwd, bwd = statistics.median(self.fwd_times), statistics.median(self.bwd_times)
        return {
            "step_time_s": step,
            "step_time_iqr_s": q3 - q1,
            "step_time_min_s": min(self.step_times),
            "step_time_max_s": max(self.step_times),
            "fwd_time_s": fwd,
            "bwd_time_s": bwd,
            "optim_time_s": statistics.median(self.optim_times),
            "bwd_fwd_ratio": bwd / fwd if fwd > 0 else float("nan"),
            "tokens_per_s": tokens_per_step / step,
            "samples_per_s": samples_per_step / step,
            "timed_steps": len(self.step_times),
            "train_time_s": sum(self.step_times),
        }


def varied_throughput(step_times: list[float], counts: list[tuple[int, int, int]]) -> dict[str, float]:
    """Throughput over timed steps of varied size (a dataset's batches): totals over the summed time, so each
    step weighs what it holds. counts: (real tokens, positions, rows) per timed step. Real tokens are the
    non-padding ones; `padded_tokens_per_s` counts every position the step computed."""
    seconds = sum(step_times)
    real, positions, rows = (sum(c[i] for c in counts) for i in range(3))
    return {"tokens_per_s": real / seconds, "padded_tokens_per_s": positions / seconds, "samples_per_s": rows / seconds,
            "padding_fraction": 1.0 - real / positions}


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]
