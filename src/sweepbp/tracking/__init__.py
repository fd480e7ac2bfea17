"""Where jobs are recorded and read back: a small interface (`Store`), MLflow behind it.

The sweep opens a sweep and its jobs and finishes them; the report and rerun read a sweep's jobs back.
Nothing else in sweepbp knows which backend is behind a `Store`: a second one is a module with a class
that has these methods, its `Backend` entry in `BACKENDS` (name, where its store class is, how its URIs are
checked and made absolute), and an option file `conf/tracking/<name>.yaml`. MLflow is the only backend
shipped (`tracking=mlflow`); `tracking=none` records nothing (`open_store` returns None). mlflow is imported
only when a store is opened (about a second): --help and config errors never pay it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sweepbp.config import ConfigError, TrackingConfig
from sweepbp.result import JobResult
from sweepbp.tracking import uris


@dataclass(frozen=True)
class Backend:
    """A kind of tracking store, known without importing it (pre-flight checks its URIs in milliseconds)."""

    title: str  # its name in messages
    store: str  # "module:class" of its Store, imported when a store is opened
    unreachable: Callable[[str], str | None]  # why a URI cannot be used now, or None (seconds at most)
    resolve: Callable[[str], str]  # the URI every job of a sweep uses (e.g. a relative SQLite path made absolute)
    folder: Callable[[str], Path | None]  # the local folder its store writes to (pre-flight checks it), if any


BACKENDS = {"mlflow": Backend("MLflow", "sweepbp.tracking.mlflow_store:MlflowStore", uris.unreachable_reason,
                              uris.resolve_uri, uris.store_folder)}
NONE = "none"
# results.json's environment entry (and tag sweepbp.env.mlflow_run_id) naming a job's run in the store; named
# when MLflow was the only backend, kept since scripts read it.
RUN_ID = "mlflow_run_id"
# sweepbp's own tags on runs (public names, listed in the README): status, sweep, parent or job, config hash,
# mode, job number, job folder
TAG_STATUS, TAG_SWEEP, TAG_ROLE, TAG_HASH, TAG_MODE, TAG_JOB, TAG_DIR = (
    "sweepbp.status", "sweepbp.sweep_id", "sweepbp.role", "sweepbp.config_hash", "sweepbp.mode", "sweepbp.job_num",
    "sweepbp.job_dir")


class StoreError(LookupError):
    """The store holds no such sweep or run; the message says what was looked for."""


@dataclass
class StoredJob:
    """One job of a sweep as the store holds it."""

    job: str  # the job's number in its sweep
    run_id: str  # the store's id of the job's run
    result: JobResult  # its results.json, or what the store has of it when that is missing


@dataclass
class JobRun:
    """A job's run as the store lists it, without its artifacts."""

    run_id: str
    tags: dict[str, str]
    complete: bool  # its record ended (FINISHED, FAILED or KILLED); a run cut short stays RUNNING


@dataclass
class RecordedRun:
    """What `sweepbp.rerun` needs of a run, read from the store alone."""

    config_text: str  # the config.yaml the job recorded: the fully resolved config
    choices: dict[str, str]  # group -> option
    losses: list[float] | None  # the loss curve of its results.json, if recorded


@dataclass(frozen=True)
class SweepAbout:
    """What a sweep's parent run says of it, from its command line (report/naming.py)."""

    name: str  # the run's name: what was swept and how many jobs (`lora.r=8,16 x memory=ckpt,none (4 jobs)`)
    command: str  # the command line, credentials hidden: the run's description
    params: dict[str, str]  # the sweep's overrides under the jobs' param names (`lora.r` = `8,16`)


# A figure of a sweep's answer for its parent run: (catalogue name, value, step); budgets are steps 0, 1, ...
Figure = tuple[str, float, int]
# A tag that every run of a sweep carries, parent and jobs, unique per sweep: what the UI groups runs by.
SWEEP_GROUP = "sweepbp.sweep"


def sweep_group(about: SweepAbout | None, sweep_id: str) -> str:
    """The `SWEEP_GROUP` tag of a sweep's runs: its name and id (two sweeps of one command line differ)."""
    return f"{about.name} · {sweep_id}" if about is not None else sweep_id


class Store(Protocol):
    """A tracking store: one run per job, under one parent run per sweep."""

    def open_sweep(self, sweep_id: str, sweep_dir: Path, about: SweepAbout | None = None) -> str:
        """The sweep's parent run (created by whichever job gets there first, named and described by `about`);
        its id."""

    def find_sweep(self, sweep_id: str) -> str | None:
        """The sweep's parent run if a job opened it (a resume=true sweep that reused every job has none)."""

    def answer_sweep(self, parent_id: str, figures: list[Figure], answer: str) -> None:
        """The sweep's answer on its parent run: its headline figures as metrics, summary.md as its description."""

    def present(self, parent_id: str | None, keys: list[str]) -> list[str]:
        """Make the store's UI show the sweep's runs usefully on first open, where the backend can (`keys`: the
        params the sweep varied); lines for the terminal saying where to look."""

    def open_job(self, result: JobResult, name: str, parent_id: str | None, tags: dict[str, str]) -> str:
        """A new run for a job, with its tags and params (the result's choices and config), status running; its id."""

    def finish_job(self, run_id: str, result: JobResult, files: list[Path]) -> None:
        """Record a job's outcome: metrics, environment, files, and last its status."""

    def complete_job(self, run_id: str, result: JobResult, files: list[Path]) -> None:
        """`finish_job` for a run whose record was cut short: the params and metrics it lacks, then the rest."""

    def job_runs(self, tags: dict[str, str]) -> list[JobRun]:
        """The job runs (not sweep parents) that carry all these tags."""

    def finish_sweep(self, sweep_id: str, sweep_dir: Path, files: list[Path], failed: bool) -> None:
        """The sweep's report goes to its parent run, which then ends."""

    def stop_sweep(self, sweep_id: str) -> None:
        """End the sweep's parent run as killed (Ctrl-C or SIGTERM)."""

    def find_finished(self, config_hash: str) -> str | None:
        """The run of this exact config that ended ok or oom (what resume=true skips), if any."""

    def result_of(self, run_id: str) -> JobResult:
        """The results.json a run recorded."""

    def sweep_jobs(self, sweep_id: str | None, known_runs: frozenset[str] = frozenset()) -> tuple[str, list[StoredJob]]:
        """The jobs of a sweep (default: the latest), leaving out the runs in `known_runs`; raises StoreError."""

    def recorded_run(self, run_id: str) -> RecordedRun:
        """The config, choices and loss curve of one run; raises StoreError."""


def backend_names() -> tuple[str, ...]:
    """Every `tracking.name` there is: the backends and `none`."""
    return (*BACKENDS, NONE)


def backend(name: str) -> Backend:
    """The backend of `tracking.name`; a ConfigError naming the choices for any other name."""
    if name not in BACKENDS:
        raise ConfigError([f"tracking.name must be one of {', '.join(backend_names())}, got {name!r}"])
    return BACKENDS[name]


def open_store(tracking: TrackingConfig) -> Store | None:
    """The store of a tracking config, or None for tracking=none."""
    if tracking.name == NONE:
        return None
    module, _, name = backend(tracking.name).store.partition(":")
    return getattr(importlib.import_module(module), name)(tracking)
