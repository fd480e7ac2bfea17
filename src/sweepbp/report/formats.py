"""How the report names and formats things: metric labels, human units, a job described by what the sweep varied."""

from __future__ import annotations

from sweepbp.report.summary import STRATEGY, Record, Summary, label

LABELS = {"tokens_per_s": "tokens/s", "samples_per_s": "samples/s", "peak_memory_bytes": "peak memory",
          "activation_bytes": "activations", "step_time_s": "step", "fwd_time_s": "fwd", "bwd_time_s": "bwd",
          "optim_time_s": "optim"}


def describe(record: Record, summary: Summary) -> str:
    """`memory=ckpt r=8`: the strategy and what else the sweep varied."""
    rest = label(record, summary.keys)
    head = f"{STRATEGY}={record.strategy}"
    return head if rest == record.strategy else f"{head} {rest}"


def describe_point(record: Record, summary: Summary) -> str:
    return (f"{describe(record, summary)} (job {record.job}), {fmt_metric(summary.y, record.metric(summary.y))} "
            f"{metric_label(summary.y)} at {fmt_metric(summary.x, record.metric(summary.x))} {metric_label(summary.x)}")


def metric_label(name: str) -> str:
    base = name.removeprefix("predicted_")
    text = LABELS.get(base, base)
    return f"predicted {text}" if name != base else text


def fmt_metric(name: str, value: float | None) -> str:
    """Human units: bytes as kB/MB/GB (decimal, like budget_gb), seconds as ms, rates with separators."""
    if value is None:
        return ""
    if name.endswith("_bytes"):
        return fmt_bytes(value)
    if name.endswith("_s") and not name.endswith("_per_s"):
        return f"{value * 1e3:,.1f} ms"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"
