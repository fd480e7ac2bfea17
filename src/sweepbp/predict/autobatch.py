"""batch.size=auto: the largest batch size whose predicted peak fits `budget_gb`.

The answer to "will it fit, and how big can the batch be?" without trial and error on the device: the
finder asks `predict.trace.predict` (seconds per question, no device memory) and returns the boundary b such
that b fits and b + 1 does not. Memory grows almost linearly with the batch, so two predictions give a
first guess, a couple more confirm it, and bisection makes the answer exact whatever the curve does
(it only assumes that a larger batch never needs less memory). In mode=measure the job then runs at
that size: its own traced step, under the same budget, is the confirming real step on the device.
With a dataset (data=jsonl, parquet) each size is predicted on its own plan, the epoch batched at that size
and its worst step traced: the answer is the largest batch whose worst batch of the epoch fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from sweepbp.config import RunConfig
from sweepbp.predict.trace import predict

MAX_BATCH = 1 << 16


def largest_fitting(fits: Callable[[int], bool], peak: Callable[[int], int], budget: int,
                    limit: int = MAX_BATCH) -> int:
    """The largest b in [1, limit] with fits(b), or 0 if batch 1 does not fit; exact for monotone `fits`.

    `peak(b)` (the predicted bytes) only steers the first guess: a line through b = 1 and b = 2.
    """
    if not fits(1):
        return 0
    if limit == 1 or not fits(2):
        return 1
    slope = peak(2) - peak(1)
    guess = max(2, min(limit, 1 + (budget - peak(1)) // slope)) if slope > 0 else limit
    lo, hi = _bracket(fits, guess, limit)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi) (hi = limit + 1 stands for "never tried")
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _bracket(fits: Callable[[int], bool], guess: int, limit: int) -> tuple[int, int]:
    """lo < hi around the boundary, starting at the guess and doubling the step outwards."""
    step = 1
    if fits(guess):
        lo = guess
        while lo < limit:
            probe = min(limit, lo + step)
            if not fits(probe):
                return lo, probe
            lo, step = probe, step * 2
        return limit, limit + 1
    hi = guess
    while True:  # fits(2) is known, so this ends at 2 at the latest
        probe = max(2, hi - step)
        if fits(probe):
            return probe, hi
        hi, step = probe, step * 2


@dataclasses.dataclass
class BatchSearch:
    """The predictions the finder asked for, by batch size (so none is traced twice)."""

    run: RunConfig
    device: str
    budget: int
    peaks: dict[int, int] = dataclasses.field(default_factory=dict)

    def peak(self, size: int) -> int:
        if size not in self.peaks:
            self.peaks[size] = predict(self.run.cfg, self.device, batch_size=size).peak_bytes
        return self.peaks[size]

    def fits(self, size: int) -> bool:
        return self.peak(size) <= self.budget

    def largest(self) -> int:
        return largest_fitting(self.fits, self.peak, self.budget)


def resolve_batch_size(run: RunConfig, device: str, metrics: dict[str, float]) -> RunConfig:
    """`run` itself, or for batch.size=auto a copy at the largest predicted-fitting size (logged as
    `auto_batch_size`); with batch.effective_size=N, the largest fitting micro-batch that divides N and the
    accumulation that makes N (`auto_accumulate`). Raises torch.OutOfMemoryError when not even one sequence
    fits."""
    if run.cfg.batch.size != "auto":
        return run
    assert run.cfg.budget_gb is not None  # config validation requires it for 'auto'
    if run.cfg.batch.effective_size is not None:
        return _accumulating(run, device, metrics, run.cfg.batch.effective_size)
    search = BatchSearch(run, device, run.cfg.budget_bytes)
    size = search.largest()
    metrics["auto_batch_size"] = float(size)
    metrics["auto_batch_predictions"] = float(len(search.peaks))
    if size == 0:
        raise torch.OutOfMemoryError(
            f"batch.size=auto: not even batch.size=1 fits budget_gb={run.cfg.budget_gb:g} on {device} "
            f"(predicted peak {search.peaks[1]:,} bytes)")
    return _with_batch(run, size, run.cfg.batch.accumulate)


def _accumulating(run: RunConfig, device: str, metrics: dict[str, float], effective: int) -> RunConfig:
    """The largest micro-batch dividing `effective` whose step (with its accumulation) is predicted to fit,
    tried from the largest down: the accumulated gradients and the step's tokens are part of each prediction."""
    tried = 0
    for size in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        candidate = _with_batch(run, size, effective // size)
        tried += 1
        peak = predict(candidate.cfg, device).peak_bytes
        if peak <= run.cfg.budget_bytes:
            metrics.update({"auto_batch_size": float(size), "auto_accumulate": float(effective // size),
                            "auto_batch_predictions": float(tried)})
            return candidate
    metrics.update({"auto_batch_size": 0.0, "auto_accumulate": 0.0, "auto_batch_predictions": float(tried)})
    raise torch.OutOfMemoryError(f"batch.size=auto: not even batch.size=1 x batch.accumulate={effective} fits "
                                 f"budget_gb={run.cfg.budget_gb:g} on {device} (predicted peak {peak:,} bytes)")


def _with_batch(run: RunConfig, size: int, accumulate: int) -> RunConfig:
    batch = dataclasses.replace(run.cfg.batch, size=size, accumulate=accumulate, effective_size=None)
    return dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, batch=batch))
