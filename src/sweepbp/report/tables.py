"""The sweep report: summary.csv, summary.md, tradeoff.png, and the answers in words.

Written into the sweep folder at the end of every multirun (callbacks.py), and rebuilt from an MLflow
store alone by `python -m sweepbp.report` (a sweep run on one machine can be reported on another):

    python -m sweepbp.report multirun/2026-11-28/19-05-25
    python -m sweepbp.report --experiment sweepbp --sweep-id ID --tracking-uri http://host:5000 --out report/
    python -m sweepbp.report --x activation_bytes --y samples_per_s --budget-gb 24
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from sweepbp.report.summary import GB, STRATEGY, Record, Summary, fastest_within, label, on_chart, plotted, summarize

FILES = ("summary.csv", "summary.md", "tradeoff.png")
TABLE_METRICS = ("tokens_per_s", "peak_memory_bytes", "activation_bytes", "step_time_s", "fwd_time_s", "bwd_time_s")
LABELS = {"tokens_per_s": "tokens/s", "samples_per_s": "samples/s", "peak_memory_bytes": "peak memory",
          "activation_bytes": "activations", "step_time_s": "step", "fwd_time_s": "fwd", "bwd_time_s": "bwd",
          "optim_time_s": "optim"}


# -- reading a sweep folder -----------------------------------------------------------------------
def folder_records(sweep_dir: Path) -> list[Record]:
    """A record per job folder (its results.json) directly under the sweep folder."""
    return [Record.from_result(json.loads(path.read_text()), path.parent.name)
            for path in sorted(sweep_dir.glob("*/results.json"))]


# -- writing ------------------------------------------------------------------------------------------
def write_report(summary: Summary, out_dir: Path) -> list[Path]:
    """Write summary.csv, summary.md and tradeoff.png into `out_dir`; returns their paths."""
    from sweepbp.report.charts import tradeoff_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / name for name in FILES)
    csv_path.write_text(csv_text(summary))
    md_path.write_text(markdown(summary))
    tradeoff_chart(summary, png_path)
    return [csv_path, md_path, png_path]


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
    metrics = [m for m in summary.metric_columns if m.removeprefix("predicted_") in TABLE_METRICS or m in (summary.x, summary.y)]
    header = ["job", *summary.keys, "status", *(metric_label(m) for m in metrics), "Pareto"]
    frontier = {id(r) for r in summary.frontier}
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for r in summary.records:
        status = r.status if r.status == "ok" else f"**{r.status}**"
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
    lines += ["", f"## What each memory strategy costs against {STRATEGY}=none at the same other settings", ""]
    lines += [_effect_line(e, summary) for e in summary.effects] or [
        f"- No pair of ok jobs differing only in the memory strategy (one of them {STRATEGY}=none)."]
    shown = {id(r) for r in on_chart(summary.records, x, y)}
    failed = [r for r in summary.records if id(r) not in shown]
    if failed:
        lines += ["", "## Not on the chart", ""]
        lines += [f"- job {r.job} ({describe(r, summary)}): {r.status}" + (f": {r.error}" if r.error else "")
                  for r in failed]
    return lines


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
    throughput, peak, activations = effect.names
    if effect.slowdown is not None:
        parts.append(f"step time x{effect.slowdown:.2f} ({fmt_metric(throughput, r.metric(throughput))} vs "
                     f"{fmt_metric(throughput, base.metric(throughput))} {metric_label(throughput)})")
    for metric, saving in ((peak, effect.memory_saving), (activations, effect.activation_saving)):
        if saving is not None:
            name = metric_label(metric)
            parts.append(f"{name} {abs(saving):.0%} {'lower' if saving >= 0 else 'higher'} "
                         f"({fmt_bytes(r.metric(metric))} vs {fmt_bytes(base.metric(metric))})")
    return f"- {describe(r, summary)} (job {r.job}) vs job {base.job}: " + ("; ".join(parts) or "no metrics to compare")


def describe(record: Record, summary: Summary) -> str:
    """`memory=ckpt r=8`: the strategy and what else the sweep varied."""
    rest = label(record, summary.keys)
    head = f"{STRATEGY}={record.strategy}"
    return head if rest == record.strategy else f"{head} {rest}"


def describe_point(record: Record, summary: Summary) -> str:
    return (f"{describe(record, summary)} (job {record.job}), {fmt_metric(summary.y, record.metric(summary.y))} "
            f"{metric_label(summary.y)} at {fmt_metric(summary.x, record.metric(summary.x))} {metric_label(summary.x)}")


# -- number formats ---------------------------------------------------------------------------------
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


def _raw(value: float | None) -> str:
    """Exact numbers for the CSV: integers without a decimal point, floats in full precision."""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


# -- the sweep's end and the command line ---------------------------------------------------------------
def report_sweep_folder(sweep_dir: Path, sweep_id: str, tracking=None) -> list[Record]:
    """At the end of a multirun: write the report into the sweep folder, log it to the sweep's parent
    MLflow run, print the table. `tracking` is the sweep's own tracking config (the records hold the
    tracking URI redacted); by default the first record's. The report covers the jobs in the folder and
    the sweep's runs in the store that the folder lacks (jobs on machines that do not share the folder);
    returns the latter."""
    records = folder_records(sweep_dir)
    tracking = tracking or (_tracking_of(records) if records else None)
    elsewhere = _store_only_records(tracking, sweep_id, records) if tracking is not None else []
    records += elsewhere
    if not records:
        return []
    summary = summarize(records)
    files = write_report(summary, sweep_dir)
    print(f"\n{table(summary)}\n\n" + "\n".join(answers(summary)) + f"\n\n[sweepbp] report: {sweep_dir}/summary.md",
          flush=True)
    if tracking is not None:
        from sweepbp.tracking.mlflow_store import Recorder

        recorder = Recorder(tracking)
        parent = recorder.sweep_parent(sweep_id, sweep_dir.resolve(), "sweepbp sweep")
        recorder.finish_sweep(parent, files, failed=any(r.status in ("failed", "killed") for r in records))
    return elsewhere


def _store_only_records(tracking, sweep_id: str, have: list[Record]) -> list[Record]:
    """Runs of the sweep that the tracking store holds but the sweep folder does not (matched by MLflow
    run id). Nothing is downloaded for the runs the folder has. A store that cannot be read leaves the
    folder's report as it is, with a warning."""
    from sweepbp.tracking.mlflow_store import StoreError, sweep_records
    from sweepbp.tracking.uris import redact, resolve_uri, unreachable_reason

    reason = unreachable_reason(tracking.uri)  # seconds at most, where MLflow's own retries take minutes
    if not reason:
        try:
            return sweep_records(resolve_uri(tracking.uri), tracking.experiment, sweep_id,
                                 known_runs=frozenset(r.run_id for r in have if r.run_id))[1]
        except StoreError:
            return []  # the store has no run of this sweep: the folder is all there is
        except Exception as err:  # noqa: BLE001 (a failing store must not cost the folder's report)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(f"[sweepbp] warning: jobs run elsewhere not added to the report, the store {redact(tracking.uri)} "
          f"could not be read: {reason}", file=sys.stderr)
    return []


def _tracking_of(records: list[Record]):
    """The tracking config the jobs used (the first job's), or None when they recorded nothing."""
    from sweepbp.config import TrackingConfig

    fields = {k.split(".", 1)[1]: v for k, v in records[0].config.items() if k.startswith("tracking.")}
    tracking = TrackingConfig(**fields)
    return tracking if tracking.name == "mlflow" else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweepbp.report", description=(
        "Rebuild a sweep's summary.csv, summary.md and tradeoff.png from the MLflow store alone."))
    parser.add_argument("sweep_dir", nargs="?", type=Path,
                        help="the sweep folder (multirun/DATE/TIME); identifies the sweep and is the default --out")
    parser.add_argument("--experiment", help="MLflow experiment name (default: search every experiment)")
    parser.add_argument("--sweep-id", help="sweep id (tag sweepbp.sweep_id); default: the folder's, else the latest")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow store (default: sqlite:///mlflow.db in the current folder)")
    parser.add_argument("--x", default="peak_memory_bytes", help="metric on the x axis (memory)")
    parser.add_argument("--y", default="tokens_per_s", help="metric on the y axis (throughput)")
    parser.add_argument("--budget-gb", type=float, action="append", default=[],
                        help="memory budget in GB (1e9 bytes) to mark and answer for; repeatable")
    parser.add_argument("--out", type=Path, help="output folder (default: the sweep folder, else ./report-<sweep id>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m sweepbp.report`: rebuild the report of one sweep from its MLflow runs."""
    args = parse_args(argv)
    from sweepbp.sweep.task import sweep_id_of
    from sweepbp.tracking.mlflow_store import StoreError, sweep_records
    from sweepbp.tracking.uris import redact, resolve_uri

    sweep_id = args.sweep_id or (sweep_id_of(args.sweep_dir.resolve()) if args.sweep_dir else None)
    uri = resolve_uri(args.tracking_uri)
    try:
        sweep_id, records = sweep_records(uri, args.experiment, sweep_id)
        source = redact(uri)
    except StoreError as err:
        records = folder_records(args.sweep_dir) if args.sweep_dir else []
        if not records:
            print(f"sweepbp.report: error: {err} (store {redact(uri)})", file=sys.stderr)
            return 1
        source = f"the results.json files of {args.sweep_dir} ({err})"  # e.g. a sweep run with tracking=none
    summary = summarize(records, args.x, args.y, args.budget_gb or None)
    out = args.out or (args.sweep_dir if args.sweep_dir and args.sweep_dir.is_dir() else Path(f"report-{sweep_id}"))
    files = write_report(summary, out)
    print(f"{table(summary)}\n\n" + "\n".join(answers(summary)))
    print(f"\n[sweepbp] sweep {sweep_id}: {len(records)} runs from {source}; wrote "
          + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
