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

from sweepbp import metrics
from sweepbp.config import ConfigError, RunConfig, config_as_dict, config_yaml, to_run_config
from sweepbp.metrics import Shown
from sweepbp.result import JobResult, Status, sweep_id_of
from sweepbp.sweep.naming import SweepPlan, single_run_name
from sweepbp.sweep.signals import Stopped, held, ignore_signals
from sweepbp.sweep.worker import JobInterrupted, run_isolated
from sweepbp.tracking import RUN_ID, SWEEP_GROUP, Store, SweepAbout, open_store, sweep_group
from sweepbp.tracking.redaction import install_log_redaction, redact_result


@dataclass
class JobContext:
    """Where a job sits: its folder, its sweep, its number."""

    output_dir: Path
    sweep_dir: Path | None
    sweep_id: str | None
    number: int
    total: int
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags of the job's run (rerun: rerun_of)
    overrides: tuple[str, ...] = ()  # the job's own overrides (Hydra's hydra.overrides.task): its run's name

    @property
    def label(self) -> str:
        return f"{self.number + 1}/{self.total}" if self.sweep_id else "1/1"


def job_context() -> JobContext:
    hydra = HydraConfig.get()
    output_dir = Path(hydra.runtime.output_dir)
    overrides = tuple(hydra.overrides.task)
    if hydra.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra.sweep.dir).resolve()
        total = int(os.environ.get("SWEEPBP_SWEEP_SIZE", "0")) or 1
        return JobContext(output_dir, sweep_dir, sweep_id_of(sweep_dir), hydra.job.num, total, overrides=overrides)
    return JobContext(output_dir, None, None, 0, 1, overrides=overrides)


def config_hash(run: RunConfig) -> str:
    """Identity of a job's measurement: the resolved config without the keys that cannot change it (a
    snapshot only draws the measured step: resume=true reuses a run made without one)."""
    data = config_as_dict(run.cfg)
    for key in ("resume", "tracking", "snapshot"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_task(cfg: DictConfig) -> str:
    """Hydra's task function: one job. Returns its status."""
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
        if result.status.is_error:
            raise SystemExit(1)
    return result.status


def record_job(run: RunConfig, context: JobContext) -> JobResult:
    """Run one job in its own process and record it: MLflow run, results.json, config.yaml.

    A stop (Ctrl-C, SIGTERM) during the job records it as `killed` with what it measured, closes the sweep's
    parent run as KILLED and re-raises `Stopped`; a stop while a finished job is recorded waits for the record.
    """
    store = _store(run)
    digest = config_hash(run)
    if run.cfg.resume and store is not None:
        previous = store.find_finished(digest)
        if previous is not None:
            return _skipped(context, store, previous)
    run_id = None
    try:
        with held():  # a run is created with its tags and params, or not at all
            run_id = _open_run(run, context, store, digest)
        result = run_isolated(run, context.label, context.output_dir)
    except KeyboardInterrupt as stop:  # the job's partial result, or a stop before the job started
        ignore_signals()  # from here the sweep only records this job, then exits
        partial = stop.result if isinstance(stop, JobInterrupted) else JobResult.of(
            run, Status.KILLED, "stopped (Ctrl-C or SIGTERM) before the job started")
        _finish(run, context, store, run_id, partial)
        if store is not None and context.sweep_id is not None:
            store.stop_sweep(context.sweep_id)
        raise Stopped(getattr(stop, "signum", signal.SIGINT)) from None
    with held():  # a Ctrl-C now takes effect once this job's record is complete
        _finish(run, context, store, run_id, result)
    return result


def _open_run(run: RunConfig, context: JobContext, store: Store | None, digest: str) -> str | None:
    if store is None:
        return None
    parent = None
    tags = {"sweepbp.config_hash": digest, "sweepbp.job_dir": str(context.output_dir), **context.tags}
    plan = SweepPlan.from_env() if context.sweep_id is not None else None
    if context.sweep_id is not None:
        about = sweep_about(plan)
        parent = store.open_sweep(context.sweep_id, context.sweep_dir, about)
        tags.update({"sweepbp.sweep_id": context.sweep_id, "sweepbp.job_num": str(context.number),
                     SWEEP_GROUP: sweep_group(about, context.sweep_id)})
    return store.open_job(run, job_name(run, context, plan), parent, tags)


def sweep_about(plan: SweepPlan | None) -> SweepAbout | None:
    """The parent run's name, description and params, from the command line's plan (None without one)."""
    return SweepAbout(plan.name, plan.command, plan.params()) if plan is not None else None


def job_name(run: RunConfig, context: JobContext, plan: SweepPlan | None) -> str:
    """A job's run name: its values of the swept keys in a sweep, its overrides in a single run, else a
    description of its config (a rerun, a single run of the defaults)."""
    if plan is not None:
        return plan.job_name(list(context.overrides), context.number)
    return single_run_name(list(context.overrides)) or _run_name(run)


def _finish(run: RunConfig, context: JobContext, store: Store | None, run_id: str | None, result: JobResult) -> None:
    redact_result(result)
    if run_id is not None:
        result.environment[RUN_ID] = run_id
    files = _write_job_files(context.output_dir, run, result)
    files += _job_charts(context.output_dir, run, result)
    files += [context.output_dir / name for name in result.artifacts]  # what the job wrote itself (snapshot=true)
    if store is not None and run_id is not None:
        store.finish_job(run_id, result, files)


def _write_job_files(folder: Path, run: RunConfig, result: JobResult) -> list[Path]:
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
        from sweepbp.report.charts import memory_timeline_chart  # matplotlib: when the first picture is drawn

        path = memory_timeline_chart(result.timeline, folder / "memory_timeline.png", _run_name(run), _twin_layers(result))
    except Exception as err:  # noqa: BLE001 (a picture must never cost a job its record)
        print(f"[sweepbp] warning: memory_timeline.png not drawn: {type(err).__name__}: {err}", file=sys.stderr)
        return []
    return [path] if path is not None else []


def _twin_layers(result: JobResult) -> int | None:
    """The depth of the twin whose step a depth-extrapolated prediction's timeline shows (the deepest traced); a
    measured job's timeline is its own step's."""
    if result.mode != "predict" or result.environment.get("predict_method") != "extrapolated":
        return None
    return int(str(result.environment["predict_traced_depths"]).split(",")[-1])


def _skipped(context: JobContext, store: Store, previous_run_id: str) -> JobResult:
    """resume=true: reuse the recorded result of an identical finished job instead of running it again."""
    result = store.result_of(previous_run_id)
    result.environment["resumed_from_run_id"] = previous_run_id
    result.write(context.output_dir)
    print(f"[sweepbp] job {context.label}: already recorded as run {previous_run_id} "
          f"({result.status}), skipped (resume=true)", file=sys.stderr)
    return result


_stores: dict[tuple[str, str, str], Store | None] = {}


def _store(run: RunConfig) -> Store | None:
    """One store per backend, URI and experiment in this process: the jobs of a sweep share its connection."""
    tracking = run.cfg.tracking
    key = (tracking.name, tracking.uri, tracking.experiment)
    if key not in _stores:
        _stores[key] = open_store(tracking)
    return _stores[key]


def _run_name(run: RunConfig) -> str:
    """The run's name in MLflow and on its memory timeline: model, memory strategy (and loss, unless
    standard), rank, batch."""
    loss = f" {run.cfg.loss.name}" if run.cfg.loss.name != "standard" else ""
    return f"{run.choices.get('model', 'model')} {run.memory_name}{loss} r={run.cfg.lora.r} b={run.cfg.batch.size}"


def _print_outcome(result: JobResult, context: JobContext) -> None:
    """One job's answer in the terminal: its status and the metrics the report's table shows, plus the loss."""
    shown = [name for name in (*metrics.shown(Shown.TABLE), "loss") if name in result.metrics]
    parts = [f"status={result.status}", *(f"{name}={_terminal(name, result.metrics[name])}" for name in shown)]
    if result.error:
        parts.append(f"error={result.error}")
    print(f"[sweepbp] {' '.join(parts)}\n[sweepbp] results: {context.output_dir / 'results.json'}", file=sys.stderr)


def _terminal(name: str, value: float) -> str:
    """A figure as the terminal line shows it: whole bytes, rates and counts with separators, the rest to 4
    decimals."""
    return f"{value:,.0f}" if metrics.unit(name) in ("bytes", "tokens/s", "sequences/s", "count") else f"{value:.4f}"
