"""A sweep's answer in a few numbers, for its parent run: so that sweeps can be compared from the list of runs.

How many jobs ran ok or out of memory, the best throughput, the lowest peak and, for each memory budget, the
fastest job that fits it; a sweep of predictions has no throughput, so its lowest peak is the predicted one
and each budget says how many jobs fit. Every name is a catalogue entry (sweepbp.metrics, "The sweep").
"""

from __future__ import annotations

from sweepbp.config import GB
from sweepbp.report.summary import Summary, fastest_within
from sweepbp.result import Status
from sweepbp.tracking import Figure


def headline(summary: Summary) -> list[Figure]:
    """The parent run's metrics: (name, value, step); a budget's figures have its index among the sweep's
    budgets (smallest first) as their step."""
    records, x, y = summary.records, summary.x, summary.y
    ok = [r for r in records if r.status == Status.OK]
    figures: list[Figure] = [("jobs_total", len(records), 0), ("jobs_ok", len(ok), 0),
                             ("jobs_oom", sum(r.status == Status.OOM for r in records), 0)]
    speeds = [r.metric(y) for r in ok if r.metric(y) is not None]
    peaks = [r.metric(x) for r in ok if r.metric(x) is not None]
    if speeds:
        figures.append((f"best_{y}", max(speeds), 0))
    if peaks:
        figures.append((f"lowest_{x}", min(peaks), 0))
    for step, budget in enumerate(summary.budgets):
        figures += [("budget_gb", budget / GB, step), ("budget_jobs_fit", sum(p <= budget for p in peaks), step)]
        best = fastest_within(records, budget, x, y) if speeds else None
        if best is not None:
            figures += [(f"budget_best_{y}", best.metric(y), step), (f"budget_best_{x}", best.metric(x), step)]
    return figures
