"""`python -m sweepbp.report`: rebuild a sweep's summary.csv, summary.md and tradeoff.png from the store alone
(a sweep run on one machine can be reported on another):

    python -m sweepbp.report multirun/2026-11-28/19-05-25
    python -m sweepbp.report --experiment sweepbp --sweep-id ID --tracking-uri http://host:5000 --out report/
    python -m sweepbp.report --x activation_bytes --y samples_per_s --budget-gb 24
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweepbp.config import TrackingConfig, redact_uri
from sweepbp.report.files import folder_records, store_records, write_report
from sweepbp.report.summary import summarize
from sweepbp.report.tables import answers, table
from sweepbp.result import sweep_id_of
from sweepbp.tracking import BACKENDS, StoreError, backend, open_store


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweepbp.report", description=(
        "Rebuild a sweep's summary.csv, summary.md and tradeoff.png from the MLflow store alone."))
    parser.add_argument("sweep_dir", nargs="?", type=Path,
                        help="the sweep folder (multirun/DATE/TIME); identifies the sweep and is the default --out")
    parser.add_argument("--experiment", help="MLflow experiment name (default: search every experiment)")
    parser.add_argument("--sweep-id", help="sweep id (tag sweepbp.sweep_id); default: the folder's, else the latest")
    parser.add_argument("--tracking", default="mlflow", choices=list(BACKENDS),
                        help="the tracking backend that holds the sweep (default: %(default)s)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow store (default: sqlite:///mlflow.db in the current folder)")
    parser.add_argument("--x", default="peak_memory_bytes", help="metric on the x axis (memory)")
    parser.add_argument("--y", default="tokens_per_s", help="metric on the y axis (throughput)")
    parser.add_argument("--budget-gb", type=float, action="append", default=[],
                        help="memory budget in GB (1e9 bytes) to mark and answer for; repeatable")
    parser.add_argument("--out", type=Path, help="output folder (default: the sweep folder, else ./report-<sweep id>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m sweepbp.report`: rebuild the report of one sweep from its runs in the tracking store."""
    args = parse_args(argv)
    sweep_id = args.sweep_id or (sweep_id_of(args.sweep_dir.resolve()) if args.sweep_dir else None)
    uri = backend(args.tracking).resolve(args.tracking_uri)
    store = open_store(TrackingConfig(name=args.tracking, uri=uri, experiment=args.experiment))
    try:
        sweep_id, jobs = store.sweep_jobs(sweep_id)
        records = store_records(jobs)
        source = redact_uri(uri)
    except StoreError as err:
        records = folder_records(args.sweep_dir) if args.sweep_dir else []
        if not records:
            print(f"sweepbp.report: error: {err} (store {redact_uri(uri)})", file=sys.stderr)
            return 1
        source = f"the results.json files of {args.sweep_dir} ({err})"  # e.g. a sweep run with tracking=none
    summary = summarize(records, args.x, args.y, args.budget_gb or None)
    out = args.out or (args.sweep_dir if args.sweep_dir and args.sweep_dir.is_dir() else Path(f"report-{sweep_id}"))
    files = write_report(summary, out)
    print(f"{table(summary)}\n\n" + "\n".join(answers(summary)))
    print(f"\n[sweepbp] sweep {sweep_id}: {len(records)} runs from {source}; wrote "
          + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0
