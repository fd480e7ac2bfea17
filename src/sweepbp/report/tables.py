"""The report as text: summary.csv's rows, the Markdown table the terminal shows, and the answers in words."""

from __future__ import annotations

import csv
import io

from sweepbp.config import GB
from sweepbp.metrics import NOISY_IQR_FRACTION, PREDICTED, Shown, shown
from sweepbp.metrics import label as metric_label
from sweepbp.report.formats import describe, describe_point, fmt_bytes, fmt_metric
from sweepbp.report.summary import Record, Summary, compared_axes, fastest_within, on_chart, plotted
from sweepbp.result import Status

TABLE_METRICS = shown(Shown.TABLE)
NO_BUDGET = ("- No memory budget given: pass budget_gb=N to the sweep (or --budget-gb N to python -m sweepbp.report) "
             "to see which jobs fit N GB.")


def csv_text(summary: Summary) -> str:
    """One row per job: job, the swept keys, status, the metrics (raw numbers), frontier flag, error, run."""
    metrics = summary.metric_columns
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["job", *summary.keys, "status", *metrics, "pareto", "error", "run_id"])
    frontier = {id(r) for r in summary.frontier}
    for r in summary.records:
        writer.writerow([r.job, *(r.value(k) for k in summary.keys), r.status, *(_raw(r.metric(m)) for m in metrics),
                         int(id(r) in frontier), r.error or "", r.run_id or ""])
    return buffer.getvalue()


def markdown(summary: Summary) -> str:
    """summary.md: the table, then the answers."""
    return "\n".join(["# Sweep summary", "", table(summary), "", *answers(summary), ""])


def table(summary: Summary) -> str:
    """A readable Markdown table (also what the terminal shows at the end of a sweep)."""
    metrics = [m for m in summary.metric_columns if m.removeprefix(PREDICTED) in TABLE_METRICS or m in (summary.x, summary.y)]
    header = ["job", *summary.keys, "status", *(metric_label(m) for m in metrics), "Pareto"]
    frontier = {id(r) for r in summary.frontier}
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for r in summary.records:
        status = r.status.value if r.status == Status.OK else f"**{r.status.value}**"
        status += " (noisy timing)" if r.metric("timing_noisy") else ""
        lines.append(_md_row([r.job, *(r.value(k) for k in summary.keys), status,
                              *(fmt_metric(m, r.metric(m)) for m in metrics), "*" if id(r) in frontier else ""]))
    return "\n".join(lines)


def answers(summary: Summary) -> list[str]:
    """The answers in words: fastest within each budget, each strategy's cost, jobs not plotted."""
    x, y = summary.x, summary.y
    lines = ["## Fastest configuration within a memory budget", ""]
    ranked = any(r.metric(y) is not None for r in summary.records)
    for budget in summary.budgets:
        if not ranked:  # e.g. predictions only: no throughput to rank by, say what fits
            lines.append(_fits_line(summary, budget))
            continue
        best = fastest_within(summary.records, budget, x, y)
        if best is None:
            smallest = min(plotted(summary.records, x, y), key=lambda r: r.metric(x), default=None)
            tail = f"; the smallest {metric_label(x)} is {describe_point(smallest, summary)}" if smallest else ""
            lines.append(f"- Within {budget / GB:g} GB: nothing fits{tail}.")
        else:
            lines.append(f"- Within {budget / GB:g} GB: {describe_point(best, summary)}.")
    if summary.frontier:
        lines.append(f"- Any budget (the Pareto frontier: from this much {metric_label(x)}, this job is the fastest):")
        lines += [f"  - from {fmt_metric(x, r.metric(x))}: {describe(r, summary)}, {fmt_metric(y, r.metric(y))} "
                  f"{metric_label(y)}" for r in summary.frontier]
    elif ranked:
        lines.append(f"- No job finished ok with both {x} and {y}.")
    if not summary.budgets and not (ranked and summary.frontier):
        lines.append(NO_BUDGET)
    for axis in compared_axes(summary.records):
        lines += ["", f"## What each {axis.title} costs against {axis.group}={axis.baseline} at the same other "
                  "settings", ""]
        lines += [_effect_line(e, summary) for e in summary.effects if e.axis == axis] or [
            f"- No pair of ok jobs differing only in the {axis.title} (one of them {axis.group}={axis.baseline})."]
    noisy = [r.job for r in summary.records if r.metric("timing_noisy")]
    if noisy:
        lines += ["", "## Noisy timings", "", f"- Job(s) {', '.join(noisy)}: the timed steps spread by more than "
                  f"{NOISY_IQR_FRACTION:.0%} of their median (`timing_noisy`): the machine was busy; rerun them on a "
                  "quiet machine before trusting their throughput."]
    shown = {id(r) for r in on_chart(summary.records, x, y)}
    failed = [r for r in summary.records if id(r) not in shown]
    if failed:
        lines += ["", "## Not on the chart", ""]
        lines += [f"- job {r.job} ({describe(r, summary)}): {r.status}" + (f": {r.error}" if r.error else
                                                                             _why_off_chart(r, x, y)) for r in failed]
    return lines


def _why_off_chart(record: Record, x: str, y: str) -> str:
    """Why an ok job is not on the chart: it lacks an axis's metric (a prediction beside measured jobs has only
    `predicted_` figures, and the axes are the measured ones)."""
    if record.status != Status.OK:
        return ""
    missing = " and no ".join(m for m in (x, y) if record.metric(m) is None)
    predicted = record.metric("peak_memory_bytes") is None and record.metric(PREDICTED + "peak_memory_bytes") is not None
    return f" (its record has no {missing}" + ("; it is a prediction, with predicted_ figures only)" if predicted else ")")


def _fits_line(summary: Summary, budget: float) -> str:
    sized = [r for r in summary.records if r.metric(summary.x) is not None]
    fits = [r for r in sized if r.metric(summary.x) <= budget]
    over = [r for r in sized if r.metric(summary.x) > budget]

    def jobs(group: list[Record]) -> str:
        return ", ".join(f"{describe(r, summary)} ({fmt_metric(summary.x, r.metric(summary.x))})" for r in group)

    return (f"- Within {budget / GB:g} GB ({metric_label(summary.x)}): fits: {jobs(fits) or 'none'}; "
            f"does not fit: {jobs(over) or 'none'}.")


def _effect_line(effect, summary: Summary) -> str:
    r, base = effect.record, effect.baseline
    parts = []
    throughput, peak, focus = effect.names
    if effect.slowdown is not None:
        parts.append(f"time per token x{effect.slowdown:.2f} ({fmt_metric(throughput, r.metric(throughput))} vs "
                     f"{fmt_metric(throughput, base.metric(throughput))} {metric_label(throughput)})")
    for metric, saving in ((peak, effect.memory_saving), (focus, effect.focus_saving)):
        if saving is not None:
            name = metric_label(metric)
            parts.append(f"{name} {abs(saving):.0%} {'lower' if saving >= 0 else 'higher'} "
                         f"({fmt_bytes(r.metric(metric))} vs {fmt_bytes(base.metric(metric))})")
    return f"- {describe(r, summary)} (job {r.job}) vs job {base.job}: " + ("; ".join(parts) or "no metrics to compare")


def _raw(value: float | None) -> str:
    """Exact numbers for the CSV: integers without a decimal point, floats in full precision."""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


