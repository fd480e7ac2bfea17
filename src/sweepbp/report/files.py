"""The report's files: summary.csv, summary.md and tradeoff.png of a sweep, written at the sweep's end
into its folder and its parent MLflow run, or rebuilt from the store (report/command.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from sweepbp.config import TrackingConfig, redact_uri
from sweepbp.report.headline import headline
from sweepbp.report.summary import Record, Summary, summarize
from sweepbp.report.tables import answers, csv_text, markdown, table
from sweepbp.result import JobResult, one_line
from sweepbp.tracking import Store, StoredJob, StoreError, backend, open_store

FILES = ("summary.csv", "summary.md", "tradeoff.png")


def folder_records(sweep_dir: Path) -> list[Record]:
    """A record per job folder (its results.json) directly under the sweep folder."""
    return [Record.from_result(JobResult.from_json(path.read_text()), path.parent.name)
            for path in sorted(sweep_dir.glob("*/results.json"))]


def store_records(jobs: list[StoredJob]) -> list[Record]:
    """The records of jobs read back from a tracking store."""
    return [Record.from_result(job.result, job.job, job.run_id) for job in jobs]


def write_report(summary: Summary, out_dir: Path) -> list[Path]:
    """Write summary.csv, summary.md and tradeoff.png into `out_dir`; returns their paths."""
    from sweepbp.report.charts import tradeoff_chart  # matplotlib: imported when a picture is drawn

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / name for name in FILES)
    csv_path.write_text(csv_text(summary))
    md_path.write_text(markdown(summary))
    tradeoff_chart(summary, png_path)
    return [csv_path, md_path, png_path]


def report_sweep_folder(sweep_dir: Path, sweep_id: str, tracking: TrackingConfig | None = None) -> list[Record]:
    """At the end of a multirun: write the report into the sweep folder, log it to the sweep's parent run,
    print the table. `tracking` is the sweep's own tracking config (the records hold the tracking URI
    redacted), None to leave the store alone. The report covers the jobs in the folder and the sweep's runs
    in the store that the folder lacks (jobs on machines that do not share the folder). Returns every record."""
    records = folder_records(sweep_dir)
    store = open_store(tracking) if tracking is not None else None
    if store is not None:
        records += _store_only_records(tracking, sweep_id, records, store)
    if not records:
        return []
    summary = summarize(records)
    files = write_report(summary, sweep_dir)
    print(f"\n{table(summary)}\n\n" + "\n".join(answers(summary)) + f"\n\n[sweepbp] report: {sweep_dir}/summary.md",
          flush=True)
    if store is not None:
        print("\n".join(_record_answer(store, summary, sweep_id, sweep_dir, files)), flush=True)
    return records


def _record_answer(store: Store, summary: Summary, sweep_id: str, sweep_dir: Path, files: list[Path]) -> list[str]:
    """The sweep's answer to its parent run, which then ends; lines saying where to look. A sweep whose every
    job was reused (resume=true) opened no parent run, and none is made for it here."""
    parent = store.find_sweep(sweep_id)
    if parent is not None:
        store.answer_sweep(parent, headline(summary), "\n".join(answers(summary)))
        store.finish_sweep(sweep_id, sweep_dir.resolve(), files,
                           failed=any(r.status.is_error for r in summary.records))
    try:
        return store.present(parent, summary.keys)
    except Exception as err:  # noqa: BLE001 (a view is a convenience: the sweep and its report are recorded)
        return [f"[sweepbp] warning: the store's view of the sweep was not set up: {one_line(err)}"]


def _store_only_records(tracking: TrackingConfig, sweep_id: str, have: list[Record],
                        store: Store | None = None) -> list[Record]:
    """Runs of the sweep that the tracking store (`store`, else opened here) holds but the sweep folder does
    not (matched by run id). Nothing is downloaded for the runs the folder has. A store that cannot be read
    leaves the folder's report as it is, with a warning."""
    reason = backend(tracking.name).unreachable(tracking.uri)  # seconds at most, where a client's retries take minutes
    if not reason:
        try:
            store = store or open_store(tracking)
            return store_records(store.sweep_jobs(sweep_id, frozenset(r.run_id for r in have if r.run_id))[1])
        except StoreError:
            return []  # the store has no run of this sweep: the folder is all there is
        except Exception as err:  # noqa: BLE001 (a failing store must not cost the folder's report)
            reason = one_line(err)
    print(f"[sweepbp] warning: jobs run elsewhere not added to the report, the store {redact_uri(tracking.uri)} "
          f"could not be read: {reason}", file=sys.stderr)
    return []
