"""MLflow tracking: one run per job, grouped under one parent run per sweep. The only module importing mlflow.

Writes go through `MlflowClient` (no fluent API, so no global active run and no MLFLOW_RUN_ID surprises),
batched, with retries for SQLite's "database is locked" when jobs run in parallel.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweepbp.config import RunConfig, TrackingConfig, leaf_params
from sweepbp.result import JobResult
from sweepbp.config import redact_uri
from sweepbp.tracking.uris import resolve_uri, sqlite_path

if TYPE_CHECKING:
    from sweepbp.report.summary import Record

T = TypeVar("T")
RUN_STATUS = {"ok": "FINISHED", "oom": "FINISHED", "diverged": "FINISHED", "skipped": "FINISHED",
              "failed": "FAILED", "killed": "KILLED"}
TAG_STATUS, TAG_SWEEP, TAG_ROLE, TAG_HASH, TAG_MODE, TAG_JOB = (
    "sweepbp.status", "sweepbp.sweep_id", "sweepbp.role", "sweepbp.config_hash", "sweepbp.mode", "sweepbp.job_num")
BATCH = 100  # MLflow's limit of params (and tags) per log_batch call


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


class Recorder:
    """Records jobs of one experiment in one tracking store."""

    def __init__(self, tracking: TrackingConfig):
        self.uri = resolve_uri(tracking.uri)
        # MlflowClient opens the store at once, and opening a new SQLite file creates its schema:
        # parallel jobs must take turns (mlflow PR #6490), or one fails with "table already exists".
        with _store_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(tracking.experiment)
        self._parents: dict[str, str] = {}  # sweep id -> parent run id, found once per process

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        db = sqlite_path(self.uri)
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        return self.client.create_experiment(name, artifact_location=location)

    # -- sweeps ------------------------------------------------------------------------------
    def sweep_parent(self, sweep_id: str, sweep_dir: Path, description: str) -> str:
        """The sweep's parent run, created by whichever job gets there first."""
        if sweep_id in self._parents:
            return self._parents[sweep_id]
        self._parents[sweep_id] = self._find_or_create_parent(sweep_id, sweep_dir, description)
        return self._parents[sweep_id]

    def _find_or_create_parent(self, sweep_id: str, sweep_dir: Path, description: str) -> str:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(sweep_dir / ".sweepbp-parent.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            runs = self.find_runs(f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'sweep'")
            if runs:
                return runs[0].info.run_id
            run = with_retry(lambda: self.client.create_run(
                self.experiment_id, run_name=f"sweep {sweep_id}",
                tags={TAG_SWEEP: sweep_id, TAG_ROLE: "sweep", "sweepbp.sweep_dir": str(sweep_dir),
                      "mlflow.note.content": description}))
            return run.info.run_id

    def close_sweep(self, sweep_id: str, status: str) -> None:
        """End the sweep's parent run (FINISHED, FAILED or KILLED) once none of its jobs runs any more."""
        for run in self.find_runs(f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'sweep'"):
            with_retry(lambda r=run: self.client.set_terminated(r.info.run_id, status))

    def find_runs(self, filter_string: str, max_results: int = 5000):
        return with_retry(lambda: self.client.search_runs([self.experiment_id], filter_string,
                                                          max_results=max_results))

    def find_finished(self, config_hash: str) -> str | None:
        """The oldest run of this exact config that ended ok or oom and was closed (what resume skips).

        The status tag is written last but one and the run closed last (`finish_job`), so a run whose
        recording was cut short (kill -9) is not FINISHED and is run again rather than reused half-made.
        """
        runs = self.find_runs(f"tags.`{TAG_HASH}` = '{config_hash}' and attributes.status = 'FINISHED'")
        for run in sorted(runs, key=lambda r: r.info.start_time):
            if run.data.tags.get(TAG_STATUS) in ("ok", "oom"):
                return run.info.run_id
        return None

    # -- jobs ---------------------------------------------------------------------------------
    def start_job(self, run: RunConfig, name: str, parent_id: str | None, tags: dict[str, str]) -> str:
        all_tags = {**tags, TAG_STATUS: "running", TAG_MODE: run.cfg.mode}
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        created = with_retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=all_tags))
        run_id = created.info.run_id
        params = {**{g: c for g, c in run.choices.items() if c}, **leaf_params(run.cfg)}
        params["tracking.uri"] = redact_uri(params.get("tracking.uri", ""))
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), BATCH):
            with_retry(lambda chunk=items[i:i + BATCH]: self.client.log_batch(run_id, params=chunk))
        return run_id

    def finish_job(self, run_id: str, result: JobResult, artifacts: list[Path]) -> None:
        """Record a job's outcome. Order matters for kill -9: files and metrics first, the status tag and
        the run's end state last, so a run that looks finished is complete."""
        now = int(time.time() * 1000)
        # `loss` is logged as its per-step history only (MLflow shows the last step as its value).
        metrics = [Metric(k, float(v), now, 0) for k, v in sorted(result.metrics.items())
                   if _is_number(v) and not (k == "loss" and result.losses)]
        metrics += [Metric("loss", float(v), now, step) for step, v in enumerate(result.losses) if _finite(v)]
        tags = [RunTag(f"sweepbp.env.{k}", str(v)[:5000]) for k, v in sorted(result.environment.items())
                if k != "traceback"]
        if result.error:
            tags.append(RunTag("sweepbp.error", result.error[:5000]))
        for path in artifacts:
            if path.exists():
                with_retry(lambda p=path: self.client.log_artifact(run_id, str(p)))
        for i in range(0, len(metrics), BATCH * 10):  # MLflow takes 1000 metrics per batch
            with_retry(lambda chunk=metrics[i:i + BATCH * 10]: self.client.log_batch(run_id, metrics=chunk))
        for i in range(0, len(tags), BATCH):
            with_retry(lambda chunk=tags[i:i + BATCH]: self.client.log_batch(run_id, tags=chunk))
        with_retry(lambda: self.client.set_tag(run_id, TAG_STATUS, result.status))
        with_retry(lambda: self.client.set_terminated(run_id, RUN_STATUS.get(result.status, "FAILED")))

    def finish_sweep(self, parent_id: str, files: list[Path], failed: bool) -> None:
        """The sweep's report goes to its parent run, which then ends (FAILED if a job failed)."""
        self.log_files(parent_id, files)
        with_retry(lambda: self.client.set_terminated(parent_id, "FAILED" if failed else "FINISHED"))

    def log_files(self, run_id: str, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                with_retry(lambda p=path: self.client.log_artifact(run_id, str(p)))

    def config_text(self, run_id: str) -> str:
        """The resolved config YAML a job logged (what `sweepbp.rerun` composes from)."""
        return self.client.download_artifacts(run_id, "config.yaml")

    def result_of(self, run_id: str) -> JobResult:
        local = self.client.download_artifacts(run_id, "results.json")
        return JobResult(**json.loads(Path(local).read_text()))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(float(value))


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


# -- reading a sweep back (python -m sweepbp.report, python -m sweepbp.rerun) ------------------------------
class StoreError(LookupError):
    """The store holds no such sweep or run; the message says what was looked for."""


def sweep_records(uri: str, experiment: str | None, sweep_id: str | None,
                  known_runs: frozenset[str] = frozenset()) -> tuple[str, list[Record]]:
    """The job records of one sweep (default: the latest) read from the store alone: each run's
    results.json artifact, or its params, metrics and tags when the artifact is missing. Runs whose id
    is in `known_runs` are left out (the caller has them already; nothing is downloaded for them)."""
    client = MlflowClient(tracking_uri=uri)
    experiment_ids = _experiment_ids(client, experiment)
    if sweep_id is None:
        parents = client.search_runs(experiment_ids, f"tags.`{TAG_ROLE}` = 'sweep'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        if not parents:
            raise StoreError(f"no sweep in experiment {experiment or '(any)'}")
        sweep_id = parents[0].data.tags[TAG_SWEEP]
    runs = client.search_runs(experiment_ids, f"tags.`{TAG_SWEEP}` = '{sweep_id}'", max_results=5000)
    jobs = [run for run in runs if run.data.tags.get(TAG_ROLE) != "sweep"]
    if not jobs:
        raise StoreError(f"no runs of sweep {sweep_id!r} in experiment {experiment or '(any)'}")
    return sweep_id, [_record_of(client, run) for run in jobs if run.info.run_id not in known_runs]


def _download(client: MlflowClient, run_id: str, path: str) -> Path:
    """One artifact of a run, as a local file (without MLflow's progress bar on the terminal)."""
    import mlflow.environment_variables as variables

    variables.MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)
    return Path(client.download_artifacts(run_id, path))


def _experiment_ids(client: MlflowClient, name: str | None) -> list[str]:
    if name is None:
        return [e.experiment_id for e in client.search_experiments()]
    found = client.get_experiment_by_name(name)
    if found is None:
        raise StoreError(f"no experiment named {name!r}")
    return [found.experiment_id]


def _record_of(client: MlflowClient, run) -> Record:
    from sweepbp.config import GROUPS
    from sweepbp.report.summary import Record

    tags = run.data.tags
    job = tags.get(TAG_JOB, run.info.run_id)
    try:
        record = Record.from_result(json.loads(_download(client, run.info.run_id, "results.json").read_text()), job)
        record.run_id = run.info.run_id
        return record
    except (MlflowException, OSError):  # no artifact (a job still running, or an artifact store gone)
        params = run.data.params
        return Record(job=job, status=tags.get(TAG_STATUS, "unknown"),
                      config={k: v for k, v in params.items() if k not in GROUPS},
                      choices={k: v for k, v in params.items() if k in GROUPS}, metrics=dict(run.data.metrics),
                      error=tags.get("sweepbp.error"), run_id=run.info.run_id)


@dataclass
class RecordedRun:
    """What `sweepbp.rerun` needs of a run, read from the store alone."""

    config_text: str  # the config.yaml artifact: the fully resolved config
    choices: dict[str, str]  # group -> option, from the run's params
    losses: list[float] | None  # the loss curve of its results.json, if logged


def recorded_run(uri: str, run_id: str) -> RecordedRun:
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
        text = _download(client, run_id, "config.yaml").read_text()
    except MlflowException as err:
        raise StoreError(f"run {run_id!r}: {str(err).splitlines()[0]}") from None
    from sweepbp.config import GROUPS

    try:
        losses = json.loads(_download(client, run_id, "results.json").read_text()).get("losses")
    except MlflowException:
        losses = None
    return RecordedRun(text, {k: v for k, v in run.data.params.items() if k in GROUPS}, losses)
