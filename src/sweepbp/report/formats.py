"""How the report names and formats things: metric labels and units from the catalogue (sweepbp.metrics),
human units, a job described by what the sweep varied."""

from __future__ import annotations

from sweepbp import metrics
from sweepbp.config import GB
from sweepbp.metrics import label as metric_label
from sweepbp.report.summary import STRATEGY, Record, Summary, label

BYTE_UNITS = (("GB", GB), ("MB", 1e6), ("kB", 1e3))  # decimal, like budget_gb and device memory sizes


def describe(record: Record, summary: Summary) -> str:
    """`memory=ckpt r=8`: the strategy and what else the sweep varied."""
    rest = label(record, summary.keys)
    head = f"{STRATEGY}={record.strategy}"
    return head if rest == record.strategy else f"{head} {rest}"


def describe_point(record: Record, summary: Summary) -> str:
    return (f"{describe(record, summary)} (job {record.job}), {fmt_metric(summary.y, record.metric(summary.y))} "
            f"{metric_label(summary.y)} at {fmt_metric(summary.x, record.metric(summary.x))} {metric_label(summary.x)}")


def fmt_metric(name: str, value: float | None) -> str:
    """Human units by the metric's unit: bytes as kB/MB/GB, seconds as ms, rates with separators."""
    if value is None:
        return ""
    unit = metrics.unit(name)
    if unit == "bytes":
        return fmt_bytes(value)
    if unit == "s":
        return f"{value * 1e3:,.1f} ms"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def byte_unit(largest: float) -> tuple[str, float]:
    """The unit (and its size) to show bytes up to `largest` in."""
    for unit, size in BYTE_UNITS:
        if abs(largest) >= size:
            return unit, size
    return "B", 1.0


def fmt_bytes(value: float) -> str:
    unit, size = byte_unit(value)
    return f"{value / size:.2f} {unit}" if size > 1 else f"{value:.0f} B"
