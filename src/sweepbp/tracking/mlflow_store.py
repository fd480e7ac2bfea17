"""The MLflow backend of `sweepbp.tracking.Store`: one run per job, under one parent run per sweep. The only
module that imports mlflow.

Writes go through `MlflowClient` (no fluent API, so no global active run and no MLFLOW_RUN_ID surprises),
batched, with retries for SQLite's "database is locked" when jobs run in parallel. Reads come from the same
runs: each job's results.json artifact, or its params, metrics and tags when the artifact is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import mlflow.environment_variables
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweepbp.config import DATASETS, GROUPS, TrackingConfig, dotted_leaves, nested, redact_uri
from sweepbp.result import JobResult, Status
from sweepbp.tracking import (
    RUN_ID,
    SWEEP_GROUP,
    TAG_HASH,
    TAG_JOB,
    TAG_MODE,
    TAG_ROLE,
    TAG_STATUS,
    TAG_SWEEP,
    Figure,
    JobRun,
    RecordedRun,
    StoredJob,
    StoreError,
    SweepAbout,
    sweep_group,
)
from sweepbp.tracking import mlflow_view as view
from sweepbp.tracking.uris import resolve_uri, sqlite_path

T = TypeVar("T")
RUN_STATUS = {Status.OK: "FINISHED", Status.OOM: "FINISHED", Status.DIVERGED: "FINISHED",
              Status.FAILED: "FAILED", Status.KILLED: "KILLED"}
TAG_COMMAND, NOTE, NOTE_LONGEST = "sweepbp.command", "mlflow.note.content", 8000  # a run's description: a tag
DATA_FILES = ("text", *DATASETS)  # data options that read a local file: logged as the run's dataset
BATCH = 100  # MLflow's limit of params (and tags) per log_batch call
# MLflow's HTTP client by default retries a lost server 7 times with exponential backoff (minutes) and waits
# 120 s for an answer. A sweep must not stop measuring for that: each call gets one retry after a 5 s timeout,
# so a refused connection fails in well under a second and a server that stopped answering in about 10 s.
# Set these variables yourself to change it (a busy shared server may want a longer timeout); a failed call
# costs only the run's place in the store (tracking/guard.py; `python -m sweepbp.report --sync` adds it later).
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def with_retry(call: Callable[[], T], attempts: int = 30) -> T:
    """Retry a store call that SQLite refused because another job held the write lock."""
    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as err:
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first writers of one SQLite file (schema creation races, mlflow PR #6490)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MlflowStore:
    """Jobs of one experiment in one MLflow tracking store (`tracking.experiment`; for reads, None searches
    every experiment). The experiment is created by the first write, never by a read."""

    def __init__(self, tracking: TrackingConfig):
        self.uri = resolve_uri(tracking.uri)
        self.experiment = tracking.experiment
        for name, value in HTTP_BOUNDS.items():  # read by MLflow at every request
            os.environ.setdefault(name, value)
        mlflow.environment_variables.MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)  # no bars on the terminal
        for chatty in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables...": noise
            logging.getLogger(chatty).setLevel(logging.WARNING)
        # MlflowClient opens the store at once, and opening a new SQLite file creates its schema:
        # parallel jobs must take turns (mlflow PR #6490), or one fails with "table already exists".
        with _store_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
        self._experiment_id: str | None = None
        self._parents: dict[str, str] = {}  # sweep id -> parent run id, found once per process

    # -- writing ------------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        """The experiment's id, creating it (artifacts next to a SQLite store) on first use. First writers of
        one store take turns (SQLite) or look again when another one was faster (a server)."""
        if self._experiment_id is None:
            with _store_lock(self.uri):
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    db = sqlite_path(self.uri)
                    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
                    try:
                        with_retry(lambda: self.client.create_experiment(
                            self.experiment, artifact_location=location,
                            tags={view.KIND_TAG: view.KIND, view.DESCRIPTION_TAG: view.DESCRIPTION}))
                    except MlflowException as err:
                        if err.error_code != "RESOURCE_ALREADY_EXISTS":
                            raise
                    found = self.client.get_experiment_by_name(self.experiment)
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def open_sweep(self, sweep_id: str, sweep_dir: Path, about: SweepAbout | None = None) -> str:
        if sweep_id not in self._parents:
            self._parents[sweep_id] = self._find_or_create_parent(sweep_id, sweep_dir, about)
        return self._parents[sweep_id]

    def _find_or_create_parent(self, sweep_id: str, sweep_dir: Path, about: SweepAbout | None) -> str:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(sweep_dir / ".sweepbp-parent.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            runs = self._parent_runs(sweep_id)
            if runs:
                return runs[0].info.run_id
            tags = {TAG_SWEEP: sweep_id, TAG_ROLE: "sweep", "sweepbp.sweep_dir": str(sweep_dir),
                    SWEEP_GROUP: sweep_group(about, sweep_id), NOTE: "sweepbp sweep"}
            if about is not None:  # the sweep's command line (a sweep not started by `python -m sweepbp` has none)
                tags.update({TAG_COMMAND: about.command, NOTE: f"`{about.command}`"})
            run = with_retry(lambda: self.client.create_run(
                self.experiment_id(), run_name=about.name if about else f"sweep {sweep_id}", tags=tags))
            params = [Param(k, v) for k, v in sorted(about.params.items())] if about else []
            for i in range(0, len(params), BATCH):
                with_retry(lambda chunk=params[i:i + BATCH]: self.client.log_batch(run.info.run_id, params=chunk))
            return run.info.run_id

    def find_sweep(self, sweep_id: str) -> str | None:
        if sweep_id not in self._parents:
            runs = self._parent_runs(sweep_id)
            if not runs:
                return None
            self._parents[sweep_id] = runs[0].info.run_id
        return self._parents[sweep_id]

    def answer_sweep(self, parent_id: str, figures: list[Figure], answer: str) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for name, value, step in figures if _finite(float(value))]
        command = with_retry(lambda: self.client.get_run(parent_id)).data.tags.get(TAG_COMMAND)
        with_retry(lambda: self.client.log_batch(parent_id, metrics=metrics))
        note = (f"`{command}`\n\n" if command else "") + answer
        with_retry(lambda: self.client.set_tag(parent_id, NOTE, note if len(note) <= NOTE_LONGEST else
                                               note[:NOTE_LONGEST - 40] + "\n\n(the rest: summary.md)"))

    def present(self, parent_id: str | None, keys: list[str]) -> list[str]:
        """The experiment's shared view (mlflow_view.py) with this sweep's params added; the URL that opens it."""
        experiment_id = self.experiment_id()
        tags = self.client.get_experiment(experiment_id).tags
        state = view.view_state(view.merged_params(tags.get(view.VIEW_TAG), keys), SWEEP_GROUP, TAG_STATUS)
        # an experiment made before sweepbp described it gets its description and kind too
        wanted = {view.KIND_TAG: view.KIND, view.DESCRIPTION_TAG: view.DESCRIPTION, view.VIEW_TAG: json.dumps(state)}
        for key, value in wanted.items():
            if key == view.VIEW_TAG or key not in tags:
                with_retry(lambda k=key, v=value: self.client.set_experiment_tag(experiment_id, k, v))
        return view.ui_lines(self.uri, experiment_id, parent_id, Path.cwd())

    def _parent_runs(self, sweep_id: str) -> list:
        return self._search(f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'sweep'",
                            experiments=[self.experiment_id()])

    def stop_sweep(self, sweep_id: str) -> None:
        for run in self._parent_runs(sweep_id):
            with_retry(lambda r=run: self.client.set_terminated(r.info.run_id, "KILLED"))

    def finish_sweep(self, sweep_id: str, sweep_dir: Path, files: list[Path], failed: bool) -> None:
        parent = self.open_sweep(sweep_id, sweep_dir)
        self._log_files(parent, files)
        with_retry(lambda: self.client.set_terminated(parent, "FAILED" if failed else "FINISHED"))

    def open_job(self, result: JobResult, name: str, parent_id: str | None, tags: dict[str, str]) -> str:
        all_tags = {**tags, TAG_STATUS: Status.RUNNING.value, TAG_MODE: result.mode}
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        created = with_retry(lambda: self.client.create_run(self.experiment_id(), run_name=name, tags=all_tags))
        self._log_params(created.info.run_id, result)
        self._log_dataset(created.info.run_id, result.config.get("data", {}))
        return created.info.run_id

    def _log_dataset(self, run_id: str, data: dict) -> None:
        """A local data file (data=text, jsonl, parquet) as the run's dataset: the UI's Datasets filter and column.
        Its digest is the file's path, size and modification time (reading a large dataset again per job would
        cost more than the run)."""
        if data.get("name") not in DATA_FILES or not data.get("path"):
            return
        path = Path(str(data["path"])).expanduser().resolve()
        try:
            stat = path.stat()
        except OSError:  # moved since the job ran (a sync later, elsewhere): the run goes without it, the store is fine
            return
        digest = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        dataset = Dataset(path.name, digest, "local", json.dumps({"uri": str(path)}))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
        with_retry(lambda: self.client.log_inputs(run_id, datasets=inputs))

    def _log_params(self, run_id: str, result: JobResult) -> None:
        """The option of every group and every leaf of the resolved config (logging the same values again is
        allowed: what completes a run cut short does)."""
        params = {**{g: c for g, c in result.choices.items() if c}, **dotted_leaves(result.config)}
        params["tracking.uri"] = redact_uri(params.get("tracking.uri", ""))
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), BATCH):
            with_retry(lambda chunk=items[i:i + BATCH]: self.client.log_batch(run_id, params=chunk))

    def finish_job(self, run_id: str, result: JobResult, files: list[Path]) -> None:
        self._finish(run_id, result, files, logged=frozenset())

    def complete_job(self, run_id: str, result: JobResult, files: list[Path]) -> None:
        self._log_params(run_id, result)
        self._finish(run_id, result, files, logged=frozenset(self.client.get_run(run_id).data.metrics))

    def _finish(self, run_id: str, result: JobResult, files: list[Path], logged: frozenset[str]) -> None:
        """Order matters for kill -9: files and metrics first, the status tag and the run's end state last,
        so a run that looks finished is complete. Metrics in `logged` are there already (not logged twice)."""
        now = int(time.time() * 1000)
        # `loss` is logged as its per-step history only (MLflow shows the last step as its value).
        metrics = [Metric(k, float(v), now, 0) for k, v in sorted(result.metrics.items())
                   if _is_number(v) and not (k == "loss" and result.losses) and k not in logged]
        if "loss" not in logged:
            metrics += [Metric("loss", float(v), now, step) for step, v in enumerate(result.losses) if _finite(v)]
        tags = [RunTag(f"sweepbp.env.{k}", str(v)[:5000]) for k, v in sorted(result.environment.items())
                if k != "traceback"]
        if result.error:
            tags.append(RunTag("sweepbp.error", result.error[:5000]))
        self._log_files(run_id, files)
        for i in range(0, len(metrics), BATCH * 10):  # MLflow takes 1000 metrics per batch
            with_retry(lambda chunk=metrics[i:i + BATCH * 10]: self.client.log_batch(run_id, metrics=chunk))
        for i in range(0, len(tags), BATCH):
            with_retry(lambda chunk=tags[i:i + BATCH]: self.client.log_batch(run_id, tags=chunk))
        with_retry(lambda: self.client.set_tag(run_id, TAG_STATUS, result.status.value))
        with_retry(lambda: self.client.set_terminated(run_id, RUN_STATUS.get(result.status, "FAILED")))

    def _log_files(self, run_id: str, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                with_retry(lambda p=path: self.client.log_artifact(run_id, str(p)))

    # -- reading --------------------------------------------------------------------------------------
    def _search(self, filter_string: str, max_results: int = 5000, experiments: list[str] | None = None,
                **kwargs) -> list:
        ids = experiments if experiments is not None else self._experiment_ids()
        return with_retry(lambda: self.client.search_runs(ids, filter_string, max_results=max_results, **kwargs))

    def _experiment_ids(self) -> list[str]:
        if self.experiment is None:
            return [e.experiment_id for e in self.client.search_experiments()]
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise StoreError(f"no experiment named {self.experiment!r}")
            self._experiment_id = found.experiment_id
        return [self._experiment_id]

    def job_runs(self, tags: dict[str, str]) -> list[JobRun]:
        where = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        try:
            runs = self._search(where)
        except StoreError:  # no experiment yet: no runs
            return []
        return [JobRun(run.info.run_id, dict(run.data.tags), run.info.status != "RUNNING") for run in runs
                if run.data.tags.get(TAG_ROLE) != "sweep"]

    def find_finished(self, config_hash: str) -> str | None:
        """The status tag is written last but one and the run closed last (`finish_job`), so a run whose
        recording was cut short (kill -9) is not FINISHED and is run again rather than reused half-made."""
        try:
            runs = self._search(f"tags.`{TAG_HASH}` = '{config_hash}' and attributes.status = 'FINISHED'")
        except StoreError:  # no experiment yet: nothing finished
            return None
        for run in sorted(runs, key=lambda r: r.info.start_time):
            if _status(run.data.tags).reusable:
                return run.info.run_id
        return None

    def result_of(self, run_id: str) -> JobResult:
        try:
            return JobResult.from_json(self._artifact(run_id, "results.json").read_text())
        except MlflowException as err:  # no such artifact is an answer, not a failing store
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise StoreError(f"run {run_id!r} has no results.json") from None

    def sweep_jobs(self, sweep_id: str | None, known_runs: frozenset[str] = frozenset()) -> tuple[str, list[StoredJob]]:
        where = f"experiment {self.experiment or '(any)'}"
        if sweep_id is None:
            parents = self._search(f"tags.`{TAG_ROLE}` = 'sweep'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
            if not parents:
                raise StoreError(f"no sweep in {where}")
            sweep_id = parents[0].data.tags[TAG_SWEEP]
        runs = self._search(f"tags.`{TAG_SWEEP}` = '{sweep_id}'")
        jobs = [run for run in runs if run.data.tags.get(TAG_ROLE) != "sweep"]
        if not jobs:
            raise StoreError(f"no runs of sweep {sweep_id!r} in {where}")
        return sweep_id, [self._stored_job(run) for run in jobs if run.info.run_id not in known_runs]

    def _stored_job(self, run) -> StoredJob:
        tags, run_id = run.data.tags, run.info.run_id
        try:
            result = self.result_of(run_id)
        except (StoreError, MlflowException, OSError):  # no artifact (a job still running, or an artifact store gone)
            params = run.data.params
            result = JobResult(status=_status(tags), mode=tags.get(TAG_MODE, "measure"),
                               config=nested({k: v for k, v in params.items() if k not in GROUPS}),
                               choices={k: v for k, v in params.items() if k in GROUPS},
                               metrics=dict(run.data.metrics), error=tags.get("sweepbp.error"))
        result.environment[RUN_ID] = run_id
        return StoredJob(job=tags.get(TAG_JOB, run_id), run_id=run_id, result=result)

    def recorded_run(self, run_id: str) -> RecordedRun:
        try:
            run = self.client.get_run(run_id)
            text = self._artifact(run_id, "config.yaml").read_text()
        except MlflowException as err:
            raise StoreError(f"run {run_id!r}: {str(err).splitlines()[0]}") from None
        try:
            losses = self.result_of(run_id).losses
        except (StoreError, MlflowException):
            losses = None
        return RecordedRun(text, {k: v for k, v in run.data.params.items() if k in GROUPS}, losses)

    def _artifact(self, run_id: str, path: str) -> Path:
        return Path(self.client.download_artifacts(run_id, path))


def _status(tags: dict[str, str]) -> Status:
    """The job's status from its tag; a run without a known one is still running (or was killed -9)."""
    try:
        return Status(tags.get(TAG_STATUS, Status.RUNNING.value))
    except ValueError:
        return Status.RUNNING


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(float(value))


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))
