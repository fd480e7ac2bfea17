"""The Hydra task: validate, then run the job in its own process and record the result.

Recording happens here, in the sweep process, never in the job's process: a job that crashes, runs out
of memory or is killed still gets its results.json and its MLflow run closed with the right status.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sweepbp.config import ConfigError, RunConfig, config_as_dict, to_run_config
from sweepbp.result import JobResult, sweep_id_of


@dataclass
class JobContext:
    """Where a job sits: its folder, its sweep, its number."""

    output_dir: Path
    sweep_dir: Path | None
    sweep_id: str | None
    number: int
    total: int
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags of the job's run (rerun: rerun_of)

    @property
    def label(self) -> str:
        return f"{self.number + 1}/{self.total}" if self.sweep_id else "1/1"


def job_context() -> JobContext:
    hydra = HydraConfig.get()
    output_dir = Path(hydra.runtime.output_dir)
    if hydra.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra.sweep.dir).resolve()
        total = int(os.environ.get("SWEEPBP_SWEEP_SIZE", "0")) or 1
        return JobContext(output_dir, sweep_dir, sweep_id_of(sweep_dir), hydra.job.num, total)
    return JobContext(output_dir, None, None, 0, 1)


def config_hash(run: RunConfig) -> str:
    """Identity of a job's measurement: the resolved config without the keys that cannot change it."""
    data = config_as_dict(run.cfg)
    for key in ("resume", "tracking"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_task(cfg: DictConfig) -> str:
    """Hydra's task function: one job. Returns its status."""
    from sweepbp.tracking.redaction import install_log_redaction

    install_log_redaction()  # again: a joblib worker process never ran the command line's main()
    context = job_context()
    try:
        run = to_run_config(cfg, dict(HydraConfig.get().runtime.choices))
    except ConfigError as err:
        for line in err.problems:
            print(f"sweepbp: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    result = record_job(run, context)
    if context.sweep_id is None:
        _print_outcome(result, context)
        if result.status in ("failed", "killed"):
            raise SystemExit(1)
    return result.status


def record_job(run: RunConfig, context: JobContext) -> JobResult:
    """Run one job in its own process and record it: MLflow run, results.json, config.yaml.

    A stop (Ctrl-C, SIGTERM) during the job records it as `killed` with what it measured, closes the sweep's
    parent run as KILLED and re-raises `Stopped`; a stop while a finished job is recorded waits for the record.
    """
    from sweepbp.sweep.signals import Stopped, held, ignore_signals
    from sweepbp.sweep.worker import JobInterrupted, run_isolated

    recorder = _recorder(run)
    digest = config_hash(run)
    if run.cfg.resume and recorder is not None:
        previous = recorder.find_finished(digest)
        if previous is not None:
            return _skipped(run, context, recorder, previous)
    run_id = None
    try:
        with held():  # a run is created with its tags and params, or not at all
            run_id = _start_run(run, context, recorder, digest)
        result = run_isolated(run, context.label)
    except KeyboardInterrupt as stop:  # the job's partial result, or a stop before the job started
        ignore_signals()  # from here the sweep only records this job, then exits
        partial = stop.result if isinstance(stop, JobInterrupted) else _not_started(run)
        _finish(run, context, recorder, run_id, partial)
        if recorder is not None and context.sweep_id is not None:
            recorder.close_sweep(context.sweep_id, "KILLED")
        raise Stopped(getattr(stop, "signum", signal.SIGINT)) from None
    with held():  # a Ctrl-C now takes effect once this job's record is complete
        _finish(run, context, recorder, run_id, result)
    return result


def _not_started(run: RunConfig) -> JobResult:
    return JobResult(status="killed", mode=run.cfg.mode, config=config_as_dict(run.cfg), choices=run.choices,
                     error="stopped (Ctrl-C or SIGTERM) before the job started")


def _start_run(run: RunConfig, context: JobContext, recorder, digest: str) -> str | None:
    if recorder is None:
        return None
    parent = None
    if context.sweep_id is not None:
        parent = recorder.sweep_parent(context.sweep_id, context.sweep_dir, "sweepbp sweep")
    tags = {"sweepbp.config_hash": digest, "sweepbp.job_dir": str(context.output_dir), **context.tags}
    if context.sweep_id is not None:
        tags["sweepbp.sweep_id"] = context.sweep_id
        tags["sweepbp.job_num"] = str(context.number)  # tracking.TAG_JOB (runner imports no mlflow)
    return recorder.start_job(run, _run_name(run), parent, tags)


def _finish(run, context, recorder, run_id, result: JobResult) -> None:
    from sweepbp.tracking.redaction import redact_result

    redact_result(result)
    if run_id is not None:
        result.environment["mlflow_run_id"] = run_id
    files = _write_job_files(context.output_dir, run, result)
    files += _job_charts(context.output_dir, run, result)
    if recorder is not None and run_id is not None:
        recorder.finish_job(run_id, result, files)


def _write_job_files(folder: Path, run: RunConfig, result: JobResult) -> list[Path]:
    from sweepbp.config import config_yaml

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    config_path.write_text(config_yaml(run.cfg))
    return [result.write(folder), config_path]


def _job_charts(folder: Path, run: RunConfig, result: JobResult) -> list[Path]:
    """memory_timeline.png of the traced step, drawn in the sweep process: about 0.3-0.4 s of CPU per job,
    plus about 0.9 s once per sweep to import matplotlib (measured on a loaded 2-core VM, docs/report.md)."""
    if not result.timeline:
        return []
    try:
        from sweepbp.report.charts import memory_timeline_chart

        path = memory_timeline_chart(result.timeline, folder / "memory_timeline.png", _run_name(run))
    except Exception as err:  # noqa: BLE001 (a picture must never cost a job its record)
        print(f"[sweepbp] warning: memory_timeline.png not drawn: {type(err).__name__}: {err}", file=sys.stderr)
        return []
    return [path] if path is not None else []


def _skipped(run: RunConfig, context: JobContext, recorder, previous_run_id: str) -> JobResult:
    """resume=true: reuse the recorded result of an identical finished job instead of running it again."""
    result = recorder.result_of(previous_run_id)
    result.environment["resumed_from_run_id"] = previous_run_id
    result.write(context.output_dir)
    print(f"[sweepbp] job {context.label}: already recorded as run {previous_run_id} "
          f"({result.status}), skipped (resume=true)", file=sys.stderr)
    return result


_recorders: dict[tuple[str, str], object] = {}


def _recorder(run: RunConfig):
    """One Recorder per store and experiment in this process: the jobs of a sweep share its connection."""
    if run.cfg.tracking.name != "mlflow":
        return None
    from sweepbp.tracking.mlflow_store import Recorder
    from sweepbp.tracking.uris import resolve_uri

    key = (resolve_uri(run.cfg.tracking.uri), run.cfg.tracking.experiment)
    if key not in _recorders:
        _recorders[key] = Recorder(run.cfg.tracking)
    return _recorders[key]


def _run_name(run: RunConfig) -> str:
    return f"{run.choices.get('model', 'model')} {run.memory_name} r={run.cfg.lora.r} b={run.cfg.batch.size}"


def _print_outcome(result: JobResult, context: JobContext) -> None:
    metrics = result.metrics
    parts = [f"status={result.status}"]
    for key, fmt in (("tokens_per_s", "{:,.0f}"), ("step_time_s", "{:.4f}"), ("peak_memory_bytes", "{:,.0f}"),
                     ("activation_bytes", "{:,.0f}"), ("loss", "{:.4f}")):
        if key in metrics:
            parts.append(f"{key}={fmt.format(metrics[key])}")
    if result.error:
        parts.append(f"error={result.error}")
    print(f"[sweepbp] {' '.join(parts)}\n[sweepbp] results: {context.output_dir / 'results.json'}", file=sys.stderr)
