"""`python -m sweepbp.report --sync SWEEP_DIR`: record in the tracking store what a sweep folder holds and the
store lacks, so that a sweep whose store failed (tracking/guard.py) ends up recorded as if it never had.

Every job folder's results.json is complete whatever happened to the store. For each job, the store's runs
of the sweep are matched by the run id its results.json names, else by its job number and config hash: a
run that ended is left alone, a run cut short (RUNNING) is completed, a missing run is created under the
sweep's parent run (which is created if the store never saw the sweep). Then the sweep's report goes to
the folder and the parent run, which ends. Running it again adds nothing. A single run's folder
(outputs/DATE/TIME) is synced the same way, without a parent run.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from sweepbp.config import TrackingConfig
from sweepbp.report.files import report_sweep_folder
from sweepbp.report.naming import SweepPlan, job_overrides, plan_of_folder, run_name
from sweepbp.result import JobResult, sweep_id_of
from sweepbp.tracking import (
    RUN_ID,
    SWEEP_GROUP,
    TAG_DIR,
    TAG_HASH,
    TAG_JOB,
    TAG_SWEEP,
    JobRun,
    Store,
    open_store,
    sweep_group,
)
from sweepbp.tracking.guard import NOT_IN_STORE

RESULTS = "results.json"
JOB_FILES = (RESULTS, "config.yaml", "memory_timeline.png")  # what the sweep logs of every job (sweep/task.py)
RESUMED = "resumed_from_run_id"  # a job resume=true did not run again: its run is the earlier sweep's


class SyncError(ValueError):
    """The folder holds nothing to sync; the message says what was looked for."""


def job_folders(folder: Path) -> list[Path]:
    """The job folders of a sweep folder (each with a results.json), or the single run's folder itself."""
    if (folder / RESULTS).is_file():
        return [folder]
    jobs = sorted((p.parent for p in folder.glob(f"*/{RESULTS}")), key=lambda p: (len(p.name), p.name))
    if not jobs:
        raise SyncError(f"no {RESULTS} in {folder} or its job folders")
    return jobs


def sync_folder(folder: Path, tracking: TrackingConfig) -> Counter:
    """Record the folder's jobs the store lacks; counts of runs `added`, `completed` and `present`. The sweep's
    parent run and its jobs' runs are named as the sweep names them (report/naming.py), from the command line
    Hydra saved in the folder."""
    jobs = job_folders(folder)
    store = open_store(tracking)
    sweep = None if jobs == [folder] else _Sweep(sweep_id_of(folder.resolve()), folder.resolve(), plan_of_folder(folder))
    runs = store.job_runs({TAG_SWEEP: sweep.id} if sweep else {TAG_DIR: os.path.abspath(folder)})
    counts: Counter = Counter()
    for job_dir in jobs:
        counts[_sync_job(store, job_dir, sweep, runs)] += 1
    if sweep is not None and (sweep.parent is not None or store.find_sweep(sweep.id) is not None):
        report_sweep_folder(folder, sweep.id, tracking)  # the summary into the folder and the parent, which ends
    elif sweep is not None:  # every job was reused from earlier sweeps (resume=true): no empty parent run
        report_sweep_folder(folder, sweep.id, None)
    return counts


class _Sweep:
    """The sweep being synced: its id, folder, command line, and its parent run once opened."""

    def __init__(self, sweep_id: str, folder: Path, plan: SweepPlan | None):
        self.id, self.folder, self.plan = sweep_id, folder, plan
        self.about = plan.about() if plan else None
        self.parent: str | None = None

    def parent_of(self, store: Store) -> str:
        if self.parent is None:
            self.parent = store.open_sweep(self.id, self.folder, self.about)
        return self.parent

    def tags(self, number: str) -> dict[str, str]:
        return {TAG_SWEEP: self.id, TAG_JOB: number, SWEEP_GROUP: sweep_group(self.about, self.id)}


def _sync_job(store: Store, job_dir: Path, sweep: _Sweep | None, runs: list[JobRun]) -> str:
    """Record one job folder's result unless its run ended; which of added, completed, present it was."""
    result = JobResult.from_json((job_dir / RESULTS).read_text())
    number = job_dir.name if sweep is not None else None
    found = _match(result, number, runs)
    if result.environment.get(RESUMED) or (found is not None and found.complete):
        outcome = "present"
    else:
        tags = {TAG_HASH: result.config_hash, TAG_DIR: os.path.abspath(job_dir), **(sweep.tags(number) if sweep else {})}
        name = run_name(sweep.plan if sweep else None, job_overrides(job_dir), int(number or 0), result.run_name)
        run_id = found.run_id if found is not None else store.open_job(
            result, name, sweep.parent_of(store) if sweep else None, tags)
        result.environment[RUN_ID] = run_id
        result.write(job_dir)  # before it is logged: the folder's and the store's results.json name the run
        files = [job_dir / name for name in (*JOB_FILES, *result.artifacts) if (job_dir / name).exists()]
        if found is not None:
            store.complete_job(run_id, result, files)
        else:
            store.finish_job(run_id, result, files)
        outcome = "completed" if found is not None else "added"
    (job_dir / NOT_IN_STORE).unlink(missing_ok=True)
    return outcome


def _match(result: JobResult, number: str | None, runs: list[JobRun]) -> JobRun | None:
    """The store's run of this job: the one its results.json names, else the one with its job number (in a
    sweep) and config hash."""
    run_id = result.environment.get(RUN_ID)
    for run in runs:
        if run.run_id == run_id:
            return run
    digest = result.config_hash
    for run in runs:
        if run.tags.get(TAG_HASH) == digest and (number is None or run.tags.get(TAG_JOB) == number):
            return run
    return None
