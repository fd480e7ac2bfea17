"""Hydra callbacks: keeping credentials out of Hydra's snapshots, and what happens once a whole sweep ran.

Jobs never raise for expected outcomes (oom, diverged, failed are recorded results), so Hydra always
reaches `on_multirun_end`: the sweep's report (summary.csv, summary.md, tradeoff.png) is written and
logged here, and the sweep's exit code is decided here: non-zero if any job `failed` or was `killed`;
out-of-memory and diverged jobs are answers, not errors, and only counted.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from sweepbp.tracking.redaction import scrub_files

ERRORS = ("failed", "killed")  # statuses that make a sweep exit non-zero


def sweep_results(sweep_dir: Path) -> list[dict]:
    """results.json of every job folder directly under the sweep folder, in job order."""
    found = []
    for path in sorted(sweep_dir.glob("*/results.json"), key=lambda p: _job_order(p.parent.name)):
        found.append(json.loads(path.read_text()))
    return found


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def summary_lines(results: list[dict], sweep_dir: Path) -> tuple[list[str], int]:
    """What a finished sweep prints, and its exit code."""
    counts = Counter(r["status"] for r in results)
    reused = sum(1 for r in results if r.get("environment", {}).get("resumed_from_run_id"))
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines = [f"[sweepbp] sweep finished: {len(results)} jobs ({summary}) in {sweep_dir}"]
    if reused:
        lines.append(f"[sweepbp] {reused} job(s) not run again: already recorded ok or oom (resume=true)")
    if counts.get("oom"):
        lines.append(f"[sweepbp] {counts['oom']} job(s) ran out of memory: recorded with status oom, not an error")
    errors = sum(counts.get(status, 0) for status in ERRORS)
    if errors:
        lines.append(f"[sweepbp] error: {errors} job(s) failed or were killed; see their results.json")
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
        elsewhere = write_sweep_report(sweep_dir, _tracking_of(config))
        results = sweep_results(sweep_dir) + [{"status": record.status} for record in elsewhere]
        lines, code = summary_lines(results, sweep_dir)
        for line in lines:
            print(line, file=sys.stderr)
        if code:
            raise SystemExit(code)


def _tracking_of(config: DictConfig):
    """The sweep's tracking config with its real URI (the jobs' records hold it redacted)."""
    from sweepbp.config import TrackingConfig

    if config.tracking.name != "mlflow":
        return None
    return TrackingConfig(name="mlflow", uri=config.tracking.uri, experiment=config.tracking.experiment)


def write_sweep_report(sweep_dir: Path, tracking=None) -> list:
    """The sweep's report into its folder and its parent MLflow run; a problem here never hides the
    jobs' results, so it is printed, not raised. Returns the records of jobs that ran elsewhere (in the
    store, not in the folder), which count towards the sweep's outcome."""
    from sweepbp.report.files import report_sweep_folder
    from sweepbp.result import sweep_id_of

    try:
        return report_sweep_folder(sweep_dir, sweep_id_of(sweep_dir.resolve()), tracking)
    except Exception as err:  # noqa: BLE001 (the report is a by-product; the runs are already recorded)
        print(f"[sweepbp] warning: the sweep report could not be written: {type(err).__name__}: {err}",
              file=sys.stderr)
        return []
