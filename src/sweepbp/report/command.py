"""`python -m sweepbp.report`: rebuild a sweep's summary.csv, summary.md and tradeoff.png from the store alone
(a sweep run on one machine can be reported on another), or record a sweep folder's missing runs in the store:

    python -m sweepbp.report multirun/2026-11-28/19-05-25
    python -m sweepbp.report --experiment sweepbp --sweep-id ID --tracking-uri http://host:5000 --out report/
    python -m sweepbp.report --x activation_bytes --y samples_per_s --budget-gb 24
    python -m sweepbp.report --sync multirun/2026-11-28/19-05-25     (report/sync.py)
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from sweepbp import metrics
from sweepbp.config import TrackingConfig, redact_uri
from sweepbp.report.files import folder_records, store_records, write_report
from sweepbp.report.summary import summarize
from sweepbp.report.sync import RESULTS, SyncError, job_folders, sync_folder
from sweepbp.report.tables import answers, table
from sweepbp.result import JobResult, one_line, sweep_id_of
from sweepbp.tracking import BACKENDS, NONE, StoreError, backend, open_store
from sweepbp.tracking.guard import root_cause
from sweepbp.tracking.redaction import redact_text

DEFAULT_URI = "sqlite:///mlflow.db"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweepbp.report", description=(
        "Rebuild a sweep's summary.csv, summary.md and tradeoff.png from the MLflow store alone."))
    parser.add_argument("sweep_dir", nargs="?", type=Path,
                        help="the sweep folder (multirun/DATE/TIME); identifies the sweep and is the default --out")
    parser.add_argument("--experiment", help="MLflow experiment name (default: search every experiment)")
    parser.add_argument("--sweep-id", help="sweep id (tag sweepbp.sweep_id); default: the folder's, else the latest")
    parser.add_argument("--tracking", default="mlflow", choices=list(BACKENDS),
                        help="the tracking backend that holds the sweep (default: %(default)s)")
    parser.add_argument("--tracking-uri", help=f"MLflow store (default: {DEFAULT_URI} in the current folder; with "
                        "--sync, the store the jobs recorded)")
    parser.add_argument("--sync", type=Path, metavar="SWEEP_DIR", help=(
        "record the runs of this sweep folder (or single run's folder) that the store lacks or holds cut short, "
        "then its summary; running it again adds nothing"))
    parser.add_argument("--x", default="peak_memory_bytes", help="metric on the x axis (memory)")
    parser.add_argument("--y", default="tokens_per_s", help="metric on the y axis (throughput)")
    parser.add_argument("--budget-gb", type=float, action="append", default=[],
                        help="memory budget in GB (1e9 bytes) to mark and answer for; repeatable")
    parser.add_argument("--out", type=Path, help="output folder (default: the sweep folder, else ./report-<sweep id>)")
    args = parser.parse_args(argv)
    for flag, name in (("--x", args.x), ("--y", args.y)):
        if not metrics.known(name):
            close = difflib.get_close_matches(name, [m.name for m in metrics.CATALOGUE], n=1)
            parser.error(f"{flag} must be a metric of the catalogue (docs/metrics.md), got {name!r}"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    if any(budget <= 0 for budget in args.budget_gb):
        parser.error(f"--budget-gb must be a positive number of GB, got {min(args.budget_gb):g}")
    return args


def main(argv: list[str] | None = None) -> int:
    """`python -m sweepbp.report`: rebuild the report of one sweep from its runs in the tracking store."""
    args = parse_args(argv)
    if args.sync is not None:
        return sync(args)
    sweep_id = args.sweep_id or (sweep_id_of(args.sweep_dir.resolve()) if args.sweep_dir else None)
    uri = backend(args.tracking).resolve(args.tracking_uri or DEFAULT_URI)
    store = open_store(TrackingConfig(name=args.tracking, uri=uri, experiment=args.experiment))
    try:
        sweep_id, jobs = store.sweep_jobs(sweep_id)
        records = store_records(jobs)
        source = redact_uri(uri)
    except StoreError as err:
        records = folder_records(args.sweep_dir) if args.sweep_dir else []
        if not records:
            absent = args.sweep_dir is not None and not args.sweep_dir.exists()
            missing = f"; no folder {str(args.sweep_dir)!r} here either" if absent else ""
            print(f"sweepbp.report: error: {err} (store {redact_uri(uri)}){missing}", file=sys.stderr)
            return 1
        source = f"the results.json files of {args.sweep_dir} ({err})"  # e.g. a sweep run with tracking=none
    summary = summarize(records, args.x, args.y, args.budget_gb or None)
    out = args.out or (args.sweep_dir if args.sweep_dir and args.sweep_dir.is_dir() else Path(f"report-{sweep_id}"))
    files = write_report(summary, out)
    print(f"{table(summary)}\n\n" + "\n".join(answers(summary)))
    print(f"\n[sweepbp] sweep {sweep_id}: {len(records)} run{'s' if len(records) != 1 else ''} from {source}; wrote "
          + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0


def sync(args: argparse.Namespace) -> int:
    """`--sync SWEEP_DIR`: the folder's runs into the store the jobs recorded (or --tracking-uri)."""
    try:
        tracking = _sync_tracking(args)
        counts = sync_folder(args.sync, tracking)
    except (SyncError, StoreError) as err:
        print(f"sweepbp.report: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, SyncError) else 1
    except Exception as err:  # noqa: BLE001 (the store failed: one line; nothing recorded twice on a rerun)
        print(f"sweepbp.report: error: the store failed ({redact_text(one_line(root_cause(err)))}); what was "
              "recorded stays, run the same command again to add the rest", file=sys.stderr)
        return 1
    print(f"[sweepbp] sync {args.sync}: {counts['added']} run(s) added, {counts['completed']} completed, "
          f"{counts['present']} already in the store {redact_uri(tracking.uri)}", file=sys.stderr)
    return 0


def _sync_tracking(args: argparse.Namespace) -> TrackingConfig:
    """The store a sync writes to: --tracking-uri, else the one the jobs recorded (without the credentials a
    URI held: give those with --tracking-uri or MLflow's MLFLOW_TRACKING_USERNAME / _PASSWORD)."""
    first = job_folders(args.sync)[0] / RESULTS
    recorded = TrackingConfig(**JobResult.from_json(first.read_text()).config.get("tracking", {}))
    if args.tracking_uri is None and recorded.name == NONE:
        raise SyncError(f"the jobs of {args.sync} recorded tracking=none: give the store with --tracking-uri")
    uri = args.tracking_uri or recorded.uri
    if "***" in uri:
        raise SyncError(f"the jobs recorded tracking.uri {uri!r} without its credentials: give it with "
                        "--tracking-uri, or its credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return TrackingConfig(name=args.tracking, uri=backend(args.tracking).resolve(uri),
                          experiment=args.experiment or recorded.experiment)
