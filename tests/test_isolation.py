"""A job's numbers do not depend on which jobs ran before it: each job is a fresh forked process.

The exact tracker's figures cannot tell (they count one step's tensors, wherever it runs), so the check is
a figure that does carry a process's history: the peak resident set size only grows within a process. A
small job run after a larger one in the same process would report the larger job's peak.
"""

from __future__ import annotations

from conftest import FAST, compose
from sweeps import in_clean_process

from sweepbp.metrics import CATALOGUE
from sweepbp.sweep.worker import run_isolated

# The exact tracker's device figures (the catalogue's memory metrics that a prediction also gives).
TRACKED = [m.name for m in CATALOGUE if m.predicted and m.unit == "bytes" and m.name != "host_offload_bytes"]
LARGER_BY = 100e6  # the large job's activations alone are about 170 MB more than the small job's


def _alone_and_after_a_larger_job() -> tuple[dict, dict, dict]:
    """What a sweep process does: fork one job after another from a process that ran no torch op."""
    small = compose([*FAST, "batch.size=2", "tracking=none"])
    large = compose([*FAST, "batch.size=32", "batch.seq_len=128", "tracking=none"])
    results = [run_isolated(small, "1/3"), run_isolated(large, "2/3"), run_isolated(small, "3/3")]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return tuple({"metrics": r.metrics, "losses": r.losses} for r in results)


def test_a_job_after_a_larger_one_is_measured_as_if_alone():
    # Run from a clean process: a fork of pytest after it ran torch ops would hang in OpenMP.
    alone, large, after = in_clean_process(_alone_and_after_a_larger_job)
    assert {k: alone["metrics"][k] for k in TRACKED} == {k: after["metrics"][k] for k in TRACKED}
    assert alone["losses"] == after["losses"]
    # Measured in one process, `after` would report at least the larger job's peak RSS.
    assert after["metrics"]["rss_peak_bytes"] < large["metrics"]["rss_peak_bytes"] - LARGER_BY
    assert large["metrics"]["activation_bytes"] > alone["metrics"]["activation_bytes"] + LARGER_BY
