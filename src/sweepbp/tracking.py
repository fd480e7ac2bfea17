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
from pathlib import Path
from typing import TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweepbp.config import RunConfig, TrackingConfig, leaf_params
from sweepbp.result import JobResult
from sweepbp.uris import redact, resolve_uri, sqlite_path

T = TypeVar("T")
RUN_STATUS = {"ok": "FINISHED", "oom": "FINISHED", "diverged": "FINISHED", "skipped": "FINISHED",
              "failed": "FAILED", "killed": "KILLED"}
TAG_STATUS, TAG_SWEEP, TAG_ROLE, TAG_HASH, TAG_MODE = (
    "sweepbp.status", "sweepbp.sweep_id", "sweepbp.role", "sweepbp.config_hash", "sweepbp.mode")
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
        self.client = MlflowClient(tracking_uri=self.uri)
        with _store_lock(self.uri):
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

    def find_runs(self, filter_string: str, max_results: int = 5000):
        return with_retry(lambda: self.client.search_runs([self.experiment_id], filter_string,
                                                          max_results=max_results))

    def find_finished(self, config_hash: str) -> str | None:
        """A run of this exact config that ended ok or oom (what resume skips)."""
        for run in self.find_runs(f"tags.`{TAG_HASH}` = '{config_hash}'"):
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
        params["tracking.uri"] = redact(params.get("tracking.uri", ""))
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), BATCH):
            with_retry(lambda chunk=items[i:i + BATCH]: self.client.log_batch(run_id, params=chunk))
        return run_id

    def finish_job(self, run_id: str, result: JobResult, artifacts: list[Path]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in sorted(result.metrics.items()) if _is_number(v)]
        metrics += [Metric("loss", float(v), now, step) for step, v in enumerate(result.losses) if _finite(v)]
        tags = [RunTag(TAG_STATUS, result.status)]
        tags += [RunTag(f"sweepbp.env.{k}", str(v)[:5000]) for k, v in sorted(result.environment.items())
                 if k != "traceback"]
        if result.error:
            tags.append(RunTag("sweepbp.error", result.error[:5000]))
        for i in range(0, len(metrics), BATCH * 10):  # MLflow takes 1000 metrics per batch
            with_retry(lambda chunk=metrics[i:i + BATCH * 10]: self.client.log_batch(run_id, metrics=chunk))
        for i in range(0, len(tags), BATCH):
            with_retry(lambda chunk=tags[i:i + BATCH]: self.client.log_batch(run_id, tags=chunk))
        for path in artifacts:
            if path.exists():
                with_retry(lambda p=path: self.client.log_artifact(run_id, str(p)))
        with_retry(lambda: self.client.set_terminated(run_id, RUN_STATUS.get(result.status, "FAILED")))

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
