"""A job's numbers do not depend on which jobs ran before it (each job is a fresh forked process)."""

from __future__ import annotations

from conftest import FAST, compose
from sweeps import in_clean_process
from sweepbp.sweep.worker import run_isolated

TRACKED = ("peak_memory_bytes", "activation_bytes", "param_bytes", "trainable_param_bytes", "grad_bytes",
           "optimizer_state_bytes", "other_bytes", "inference_peak_bytes")


def _alone_and_after_a_larger_job() -> tuple[dict, dict, list, list]:
    """What a sweep process does: fork one job after another from a process that ran no torch op."""
    small = compose([*FAST, "batch.size=2", "tracking=none"])
    large = compose([*FAST, "batch.size=8", "memory=none", "tracking=none"])
    alone = run_isolated(small, "1/1")
    run_isolated(large, "1/2")
    after = run_isolated(small, "2/2")
    assert alone.status == after.status == "ok", (alone.error, after.error)
    return ({k: alone.metrics[k] for k in TRACKED}, {k: after.metrics[k] for k in TRACKED}, alone.losses, after.losses)


def test_tracked_figures_are_identical_first_or_after_a_larger_job():
    # Run from a clean process: a fork of pytest after it ran torch ops would hang in OpenMP.
    alone, after, alone_losses, after_losses = in_clean_process(_alone_and_after_a_larger_job)
    assert alone == after
    assert alone_losses == after_losses
