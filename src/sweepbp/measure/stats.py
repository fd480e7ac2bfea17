"""The statistics of the timed steps: medians, their spread, throughput, and when the spread is too large to
trust them. No torch here: the live progress line (sweep/progress.py) computes its rate with the same
`throughput` as the results, so the line and the final table agree."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from sweepbp.metrics import NOISY_IQR_FRACTION


def throughput(units_per_step: float, step_times: list[float]) -> float:
    """Units (tokens, sequences) per second: one step's units over the median step time."""
    return units_per_step / statistics.median(step_times)


def spread(times: list[float]) -> float:
    """The interquartile range of times that should be equal, as a fraction of their median (`timing_spread`)."""
    q1, q3 = quartiles(times)
    return (q3 - q1) / statistics.median(times)


def noise(times: list[float]) -> dict[str, float]:
    """`timing_spread` and `timing_noisy` of times that should be equal: noisy when the spread makes their
    median untrustworthy (metrics.NOISY_IQR_FRACTION)."""
    times_spread = spread(times)
    return {"timing_spread": times_spread, "timing_noisy": float(times_spread > NOISY_IQR_FRACTION)}


def is_noisy(times: list[float]) -> bool:
    return bool(noise(times)["timing_noisy"])


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


@dataclass
class TimingSummary:
    """Medians and spread over the timed (post-warm-up, untraced) steps."""

    step_times: list[float]
    fwd_times: list[float]
    bwd_times: list[float]
    optim_times: list[float]

    def metrics(self, tokens_per_step: int, samples_per_step: int) -> dict[str, float]:
        step = statistics.median(self.step_times)
        q1, q3 = quartiles(self.step_times)
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
            "tokens_per_s": throughput(tokens_per_step, self.step_times),
            "samples_per_s": throughput(samples_per_step, self.step_times),
            "timed_steps": len(self.step_times),
            "train_time_s": sum(self.step_times),
            **noise(self.step_times),
        }


def varied_throughput(step_times: list[float], counts: list[tuple[int, int, int]]) -> dict[str, float]:
    """Throughput over timed steps of varied size (a dataset's batches): totals over the summed time, so each
    step weighs what it holds. counts: (real tokens, positions, rows) per timed step. Real tokens are the
    non-padding ones; `padded_tokens_per_s` counts every position the step computed."""
    seconds = sum(step_times)
    real, positions, rows = (sum(c[i] for c in counts) for i in range(3))
    # a dataset's steps differ in size on purpose: the noise is judged on their time per position
    per_position = [t / c[1] for t, c in zip(step_times, counts)]
    return {"tokens_per_s": real / seconds, "padded_tokens_per_s": positions / seconds, "samples_per_s": rows / seconds,
            "padding_fraction": 1.0 - real / positions, **noise(per_position)}
