"""Hydra callbacks: keeping credentials out of Hydra's snapshots, and what happens once a whole sweep ran.

Jobs never raise for expected outcomes (oom, diverged, failed are recorded results), so Hydra always
reaches `on_multirun_end`: the sweep's report (summary.csv, summary.md, tradeoff.png) is written and
logged here, and the sweep's exit code is decided here: non-zero if any job `failed` or was `killed`;
out-of-memory and diverged jobs are answers, not errors, and only counted.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from sweepbp.config import TrackingConfig
from sweepbp.report.files import folder_records, report_sweep_folder
from sweepbp.report.summary import Record
from sweepbp.result import Status, sweep_id_of
from sweepbp.tracking import NONE
from sweepbp.tracking.guard import missing_runs_line, not_in_store
from sweepbp.tracking.redaction import scrub_files


def summary_lines(records: list[Record], sweep_dir: Path) -> tuple[list[str], int]:
    """What a finished sweep prints, and its exit code: non-zero when a job failed or was killed."""
    counts = Counter(r.status.value for r in records)
    reused = sum(1 for r in records if r.resumed)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines = [f"[sweepbp] sweep finished: {len(records)} jobs ({summary}) in {sweep_dir}"]
    if reused:
        lines.append(f"[sweepbp] {reused} job(s) not run again: already recorded ok or oom (resume=true)")
    if counts.get(Status.OOM.value):
        lines.append(f"[sweepbp] {counts[Status.OOM.value]} job(s) ran out of memory: recorded with status oom, not an error")
    errors = sum(1 for r in records if r.status.is_error)
    if errors:
        lines.append(f"[sweepbp] error: {errors} job(s) failed or were killed; see their results.json")
    missing = missing_runs_line(sweep_dir)
    if missing:
        lines.append(missing)
    return lines, 1 if errors else 0


class SweepEnd(Callback):
    """Scrubs credentials from Hydra's snapshots, counts the sweep's outcomes and sets the exit code."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        hydra = config.hydra
        files = []
        if hydra.output_subdir is not None:
            files += sorted((Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml"))
        if hydra.mode == RunMode.MULTIRUN:
            files.append(Path(hydra.sweep.dir) / "multirun.yaml")
        scrub_files(files)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        # A store that failed during the sweep is not asked again: the sync command completes the parent run.
        tracking = None if not_in_store(sweep_dir) else _tracking_of(config)
        lines, code = summary_lines(write_sweep_report(sweep_dir, tracking), sweep_dir)
        for line in lines:
            print(line, file=sys.stderr)
        if code:
            raise SystemExit(code)


def _tracking_of(config: DictConfig) -> TrackingConfig | None:
    """The sweep's tracking config with its real URI (the jobs' records hold it redacted)."""
    if config.tracking.name == NONE:
        return None
    return TrackingConfig(name=config.tracking.name, uri=config.tracking.uri, experiment=config.tracking.experiment)


def write_sweep_report(sweep_dir: Path, tracking: TrackingConfig | None = None) -> list[Record]:
    """The sweep's report into its folder and its parent run; a problem here never hides the jobs'
    results, so it is printed, not raised. Returns the records of every job of the sweep: those in the folder
    and those only the store has (jobs that ran elsewhere), which count towards the sweep's outcome."""
    try:
        return report_sweep_folder(sweep_dir, sweep_id_of(sweep_dir.resolve()), tracking)
    except Exception as err:  # noqa: BLE001 (the report is a by-product; the runs are already recorded)
        print(f"[sweepbp] warning: the sweep report could not be written: {type(err).__name__}: {err}",
              file=sys.stderr)
    return folder_records(sweep_dir)  # the sweep's outcome from its folder alone
