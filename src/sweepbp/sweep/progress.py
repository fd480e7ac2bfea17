"""A live line per job: job i of N, step k of K, tokens/s so far. Quiet (one line per job) in CI.

Its rate is the results' own statistic over the timed steps so far (measure/stats.py: tokens of a step over the
median step time; with a dataset, whose batches differ, the real tokens over the summed time): the last line a
job prints equals its `tokens_per_s`."""

from __future__ import annotations

import os
import statistics
import sys
import time

from sweepbp.config import DATASETS, RunConfig
from sweepbp.measure.stats import throughput


def is_quiet() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("SWEEPBP_QUIET") == "1"


class ProgressLine:
    """Called after every step; prints to stderr, overwriting the line on a terminal."""

    def __init__(self, label: str, run: RunConfig):
        self.label = label
        self.steps = run.cfg.trainer.steps
        self.tty = sys.stderr.isatty()
        self.quiet = is_quiet()
        self.varied = run.cfg.data.name in DATASETS  # batches of varied size (job.py: varied_throughput)
        self.step_times: list[float] = []
        self.tokens: list[int] = []  # counted from the batches: batch.size=auto is only known inside the job
        self.last_print = 0.0

    def __call__(self, step: int, loss: float, step_time: float, tokens: int) -> None:
        if step_time > 0:
            self.step_times.append(step_time)
            self.tokens.append(tokens)
        done = step + 1 == self.steps
        if self.quiet and not done:
            return
        now = time.monotonic()
        if not done and not self.tty and now - self.last_print < 5.0:
            return  # a log file gets a line every 5 s, not one per step
        self.last_print = now
        rate = f"{self._rate():,.0f} tokens/s" if self.step_times else "warming up"
        line = f"[sweepbp] job {self.label} | step {step + 1}/{self.steps} | loss {loss:.4f} | {rate}"
        end = "\n" if done or not self.tty else ""
        sys.stderr.write(("\r\033[K" if self.tty else "") + line + end)
        sys.stderr.flush()

    def say(self, text: str) -> None:
        """One line about the job before its steps (also when quiet): e.g. the batch size `auto` chose."""
        sys.stderr.write(f"[sweepbp] job {self.label} | {text}\n")
        sys.stderr.flush()

    def _rate(self) -> float:
        if self.varied:
            return sum(self.tokens) / sum(self.step_times)
        return throughput(statistics.median(self.tokens), self.step_times)
