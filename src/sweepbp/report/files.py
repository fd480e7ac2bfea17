"""The report's files: summary.csv, summary.md and tradeoff.png of a sweep, written at the sweep's end
into its folder and its parent MLflow run, or rebuilt from the store (report/command.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sweepbp.report.summary import Record, summarize
from sweepbp.report.tables import answers, csv_text, markdown, table

FILES = ("summary.csv", "summary.md", "tradeoff.png")


def folder_records(sweep_dir: Path) -> list[Record]:
    """A record per job folder (its results.json) directly under the sweep folder."""
    return [Record.from_result(json.loads(path.read_text()), path.parent.name)
            for path in sorted(sweep_dir.glob("*/results.json"))]


def write_report(summary: Summary, out_dir: Path) -> list[Path]:
    """Write summary.csv, summary.md and tradeoff.png into `out_dir`; returns their paths."""
    from sweepbp.report.charts import tradeoff_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / name for name in FILES)
    csv_path.write_text(csv_text(summary))
    md_path.write_text(markdown(summary))
    tradeoff_chart(summary, png_path)
    return [csv_path, md_path, png_path]


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
    from sweepbp.config import redact_uri
    from sweepbp.tracking.uris import resolve_uri, unreachable_reason

    reason = unreachable_reason(tracking.uri)  # seconds at most, where MLflow's own retries take minutes
    if not reason:
        try:
            return sweep_records(resolve_uri(tracking.uri), tracking.experiment, sweep_id,
                                 known_runs=frozenset(r.run_id for r in have if r.run_id))[1]
        except StoreError:
            return []  # the store has no run of this sweep: the folder is all there is
        except Exception as err:  # noqa: BLE001 (a failing store must not cost the folder's report)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(f"[sweepbp] warning: jobs run elsewhere not added to the report, the store {redact_uri(tracking.uri)} "
          f"could not be read: {reason}", file=sys.stderr)
    return []


def _tracking_of(records: list[Record]):
    """The tracking config the jobs used (the first job's), or None when they recorded nothing."""
    from sweepbp.config import TrackingConfig

    fields = {k.split(".", 1)[1]: v for k, v in records[0].config.items() if k.startswith("tracking.")}
    tracking = TrackingConfig(**fields)
    return tracking if tracking.name == "mlflow" else None
