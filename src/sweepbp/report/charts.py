"""Pictures: the sweep's trade-off chart and one run's memory timeline. matplotlib, Agg, no pyplot.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot, so no global figure registry
and no display backend in a long-running sweep process). Imported lazily, only when a picture is drawn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from sweepbp.config import GB
from sweepbp.metrics import label as metric_label
from sweepbp.report.formats import byte_unit, describe, fmt_bytes
from sweepbp.report.summary import BASELINE, Summary, label, on_chart, plotted
from sweepbp.result import Status

DPI = 110
# Categories of the memory tracker, bottom to top of the stack, with what they hold.
CATEGORY_LABELS = {
    "param": "weights (frozen base)",
    "quant_state": "quantisation state",
    "trainable": "adapter weights",
    "grad": "adapter gradients",
    "optimizer_state": "optimizer state",
    "activation": "saved activations (and recompute)",
    "logits": "logits and loss (and their gradients)",
    "other": "other (temporaries, activation gradients)",
}
CATEGORY_COLORS = {"param": "#9e9e9e", "quant_state": "#5f5f5f", "trainable": "#4c72b0", "grad": "#dd8452", "optimizer_state": "#8172b3",
                   "activation": "#55a868", "logits": "#c44e52", "other": "#c4ad66"}
PHASE_COLORS = {"forward": "#e8f1fb", "loss": "#fbe6e6", "backward": "#fbeee6", "optim": "#efeaf7"}


# -- the sweep's trade-off chart -------------------------------------------------------------------
def tradeoff_chart(summary: Summary, path: Path) -> Path:
    """Memory (x) against throughput (y), one point per ok job, coloured by memory strategy, labelled by
    what the sweep varied, the Pareto frontier drawn, budgets as vertical lines; the rest listed beside."""
    x, y = summary.x, summary.y
    points = plotted(summary.records, x, y)
    shown = {id(r) for r in on_chart(summary.records, x, y)}
    left_out = [r for r in summary.records if id(r) not in shown]
    fig = Figure(figsize=(10.5 if left_out else 8.0, 5.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    top = max([r.metric(x) or 0.0 for r in summary.records] + summary.budgets + [1.0])
    unit, size = byte_unit(top)
    if points:
        ax.set_xlim(0, top / size * 1.15)  # room for the labels of the rightmost points
        _scatter(ax, summary, points, size)
    elif any(r.metric(x) is not None for r in summary.records):
        _memory_bars(ax, summary, unit, size)  # e.g. mode=predict: memory only, no throughput
    for budget in summary.budgets:
        ax.axvline(budget / size, color="#c44e52", linestyle="--", linewidth=1.2, label=f"budget {budget / GB:g} GB")
        if points:  # on the bar chart the oom jobs are only listed beside it
            _at_budget(ax, summary, budget, size)
    if points:
        ax.set_xlabel(f"{metric_label(x)} ({unit})  [{x}]")
        ax.set_ylabel(f"{metric_label(y)}  [{y}]")
        ax.set_ylim(0, max(r.metric(y) for r in points) * 1.12)
    ax.grid(True, alpha=0.3)
    what = f"{metric_label(y)} against {metric_label(x)}" if points else f"{metric_label(x)} by job"
    ax.set_title(f"sweepbp: {what}, {len(summary.records)} jobs")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    if left_out:
        lines = [f"job {r.job}: {r.status}\n  {describe(r, summary)}" for r in left_out]
        fig.text(1.0, 0.5, "Not plotted\n\n" + "\n".join(lines), ha="left", va="center", fontsize=8,
                 family="monospace", bbox={"boxstyle": "round", "facecolor": "#f7f7f7", "edgecolor": "#cccccc"},
                 transform=fig.transFigure)
    fig.savefig(path, bbox_inches="tight")
    return path


def _strategy_colors(summary: Summary) -> dict[str, str]:
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    names = sorted({r.strategy for r in summary.records}, key=lambda s: (s != BASELINE, s))
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _scatter(ax, summary: Summary, points, size: float) -> None:
    x, y = summary.x, summary.y
    colors = _strategy_colors(summary)
    for strategy, color in colors.items():
        mine = [r for r in points if r.strategy == strategy]
        if mine:
            ax.scatter([r.metric(x) / size for r in mine], [r.metric(y) for r in mine], s=60, color=color,
                       edgecolor="black", linewidth=0.5, zorder=3, label=f"memory={strategy}")
    for r in points:
        ax.annotate(label(r, summary.keys), (r.metric(x) / size, r.metric(y)), textcoords="offset points",
                    xytext=(6, 5), fontsize=8)
    if summary.frontier:
        xs = [r.metric(x) / size for r in summary.frontier]
        ys = [r.metric(y) for r in summary.frontier]
        # The frontier is a staircase: past each point, the best reachable throughput stays until the next.
        ax.step(xs + [ax.get_xlim()[1]], ys + [ys[-1]], where="post", color="#333333", linestyle=":",
                linewidth=1.2, zorder=2, label="Pareto frontier")


def _memory_bars(ax, summary: Summary, unit: str, size: float) -> None:
    """When no job has the y metric, show each job's memory as a bar (still with budget lines)."""
    x = summary.x
    colors = _strategy_colors(summary)
    shown = on_chart(summary.records, x, summary.y)
    names = [f"job {r.job}: {describe(r, summary)}" for r in shown]
    ax.barh(names, [r.metric(x) / size for r in shown], color=[colors[r.strategy] for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric_label(x)} ({unit})  [{x}]")


def _at_budget(ax, summary: Summary, budget: float, size: float) -> None:
    """Jobs that ran out of memory sit on the budget line at zero throughput."""
    oom = [r for r in summary.records if r.status == Status.OOM]
    if oom:
        ax.scatter([budget / size] * len(oom), [0.0] * len(oom), marker="x", s=70, color="#c44e52", zorder=4,
                   clip_on=False, label="out of memory")
        for i, r in enumerate(oom):
            ax.annotate(f"oom: {label(r, summary.keys)}", (budget / size, 0.0), textcoords="offset points",
                        xytext=(6, 8 + 11 * i), fontsize=7, color="#c44e52")


# -- one run's memory timeline --------------------------------------------------------------------
def memory_timeline_chart(timeline: list[dict], path: Path, title: str, twin_layers: int | None = None) -> Path | None:
    """Live bytes by category through the traced training step, phases shaded. None without samples.

    `twin_layers`: the timeline is that of a shallow twin of the model (a depth-extrapolated prediction), and
    the title says so: its peak is the twin's, not the model's.

    x is the allocation event (a sample is taken at every storage created or freed), not time: the
    tracker counts events, and the traced step is not the timed one.
    """
    samples = _from_first_phase(timeline)
    if not samples:
        return None
    categories = [c for c in CATEGORY_LABELS if any(s["by_category"].get(c, 0) for s in samples)]
    top = max(sum(s["by_category"].values()) for s in samples)
    host = [s.get("host", 0) for s in samples]
    unit, size = byte_unit(max(top, max(host)))
    fig = Figure(figsize=(9.0, 4.6), dpi=DPI)
    # fixed margins for the legend's fixed labels: a constrained layout costs a third of the drawing (one chart
    # per job, drawn by the sweep process between jobs)
    fig.subplots_adjust(left=0.07, right=0.64, top=0.82, bottom=0.11)
    ax = fig.add_subplot()
    steps = list(range(len(samples)))
    _shade_phases(ax, samples)
    ax.stackplot(steps, *[[s["by_category"].get(c, 0) / size for s in samples] for c in categories],
                 labels=[CATEGORY_LABELS[c] for c in categories], colors=[CATEGORY_COLORS[c] for c in categories],
                 linewidth=0, zorder=2)
    if any(host):
        ax.plot(steps, [h / size for h in host], color="black", linestyle="--", linewidth=1.2, zorder=3,
                label="host memory (offloaded)")
    ax.set_xlim(0, max(1, len(samples) - 1))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("allocation events through one training step (traced step, untimed)")
    ax.set_ylabel(f"live memory ({unit})")
    twin = f"\n(the timeline of its {twin_layers}-layer twin; the model's figures are extrapolated)" if twin_layers else ""
    ax.set_title("\n".join(textwrap.wrap(f"{title}: peak {fmt_bytes(top)}", 90)) + twin, fontsize=10, pad=16,
                 loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.savefig(path)  # a tight bounding box would draw it all twice
    return path


def _from_first_phase(timeline: list[dict]) -> list[dict]:
    """Drop the samples taken while pre-existing tensors were registered, keeping the state they built."""
    first = next((i for i, s in enumerate(timeline) if s.get("phase") != "setup"), None)
    return [] if first is None else timeline[max(0, first - 1):]


def _shade_phases(ax, samples: list[dict]) -> None:
    start = 0
    for i in range(1, len(samples) + 1):
        if i < len(samples) and samples[i]["phase"] == samples[start]["phase"]:
            continue
        phase = samples[start]["phase"]
        if phase in PHASE_COLORS:
            ax.axvspan(start, i - 1, color=PHASE_COLORS[phase], zorder=0)
            ax.text((start + i - 1) / 2, 1.01, phase, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8)
        start = i
