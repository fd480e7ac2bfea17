"""Hydra callbacks: what happens once a whole sweep has run.

Jobs never raise for expected outcomes (oom, diverged, failed are recorded results), so Hydra always
reaches `on_multirun_end`: the sweep's report (summary.csv, summary.md, tradeoff.png) is written and
logged here, and the sweep's exit code is decided here: non-zero if any job `failed`.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_results(sweep_dir: Path) -> list[dict]:
    """results.json of every job folder directly under the sweep folder, in job order."""
    found = []
    for path in sorted(sweep_dir.glob("*/results.json"), key=lambda p: _job_order(p.parent.name)):
        found.append(json.loads(path.read_text()))
    return found


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


class SweepEnd(Callback):
    """Counts the sweep's outcomes, writes its summary and sets the exit code."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = sweep_results(sweep_dir)
        counts = Counter(r["status"] for r in results)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"[sweepbp] sweep finished: {len(results)} jobs ({summary}) in {sweep_dir}", file=sys.stderr)
        write_sweep_report(sweep_dir)
        if counts.get("failed"):
            print(f"[sweepbp] error: {counts['failed']} job(s) failed; see their results.json", file=sys.stderr)
            raise SystemExit(1)


def write_sweep_report(sweep_dir: Path) -> None:
    """The sweep's report into its folder and its parent MLflow run; a problem here never hides the
    jobs' results or changes the exit code, so it is printed, not raised."""
    from sweepbp.report import report_sweep_folder
    from sweepbp.runner import sweep_id_of

    try:
        report_sweep_folder(sweep_dir, sweep_id_of(sweep_dir.resolve()))
    except Exception as err:  # noqa: BLE001 (the report is a by-product; the runs are already recorded)
        print(f"[sweepbp] warning: the sweep report could not be written: {type(err).__name__}: {err}",
              file=sys.stderr)
