"""The Hydra task: validate, then run the job in its own process and record the result.

Recording happens here, in the sweep process, never in the job's process: a job that crashes, runs out
of memory or is killed still gets its results.json and its MLflow run closed with the right status.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sweepbp import metrics
from sweepbp.config import ConfigError, RunConfig, config_yaml, redact_uri, to_run_config
from sweepbp.metrics import NOISY_IQR_FRACTION, PREDICTED, Shown
from sweepbp.result import JobResult, Status, sweep_id_of
from sweepbp.report.naming import SweepPlan, run_name
from sweepbp.sweep.signals import Stopped, held, ignore_signals
from sweepbp.sweep.worker import JobInterrupted, run_isolated
from sweepbp.tracking import (
    NONE,
    RUN_ID,
    SWEEP_GROUP,
    TAG_DIR,
    TAG_HASH,
    TAG_JOB,
    TAG_SWEEP,
    StoreError,
    open_store,
    sweep_group,
)
from sweepbp.tracking.guard import STOPPED, Guarded, StoreDown, mark_not_in_store, missing_runs_line, sync_command
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
        _say_not_in_store(context)
        if result.status.is_error:
            raise SystemExit(1)
    return result.status


def record_job(run: RunConfig, context: JobContext) -> JobResult:
    """Run one job in its own process and record it: results.json, config.yaml, then its MLflow run.

    A stop (Ctrl-C, SIGTERM) during the job records it as `killed` with what it measured, closes the sweep's
    parent run as KILLED and re-raises `Stopped`; a stop while a finished job's files are written waits for
    them. The store never holds a job up: a store call a stop cuts short leaves its run RUNNING (as `kill -9`
    does), and once the store has failed the jobs are recorded in their folders only (tracking/guard.py).
    """
    try:
        return _record_job(run, context)
    except KeyboardInterrupt:
        _say_not_in_store(context)
        raise


def _record_job(run: RunConfig, context: JobContext) -> JobResult:
    store = _store(run)
    opened = JobResult.of(run, Status.RUNNING)  # what the run is opened with: params, name, config hash
    if run.cfg.resume and store is not None:
        skipped = _skipped(run, context, store, opened.config_hash)
        if skipped is not None:
            return skipped
    run_id = None
    try:
        run_id = _open_run(run, context, store, opened)
        result = run_isolated(run, context.label, context.output_dir)
    except KeyboardInterrupt as stop:  # the job's partial result, or a stop before the job started
        ignore_signals()  # from here the sweep only records this job, then exits
        partial = stop.result if isinstance(stop, JobInterrupted) else JobResult.of(
            run, Status.KILLED, "stopped (Ctrl-C or SIGTERM) before the job started")
        _finish(run, context, store, run_id, partial)
        if store is not None and context.sweep_id is not None:
            _unless_down(lambda: store.stop_sweep(context.sweep_id), run, context)
        raise Stopped(getattr(stop, "signum", signal.SIGINT)) from None
    _finish(run, context, store, run_id, result)
    _warn_if_noisy(result, context)
    return result


def _warn_if_noisy(result: JobResult, context: JobContext) -> None:
    """One line for a job whose timed steps spread too much for its throughput to be trusted."""
    figures = result.metrics
    if not figures.get("timing_noisy"):
        return
    spread = figures["timing_spread"]
    print(f"[sweepbp] warning: job {context.label}: timing_noisy: its step times spread by {spread:.0%} of their "
          f"median (interquartile range; over {NOISY_IQR_FRACTION:.0%} is noisy), machine load "
          f"{figures.get('load_1m_end', float('nan')):.1f} on {figures.get('cpus_end', float('nan')):.0f} CPUs: "
          "rerun it on a quiet machine before trusting its throughput", file=sys.stderr, flush=True)


def _open_run(run: RunConfig, context: JobContext, store: Guarded | None, opened: JobResult) -> str | None:
    if store is None:
        return None
    tags = {TAG_HASH: opened.config_hash, TAG_DIR: str(context.output_dir), **context.tags}
    plan = SweepPlan.from_env() if context.sweep_id is not None else None
    about = plan.about() if plan is not None else None
    if context.sweep_id is not None:
        tags.update({TAG_SWEEP: context.sweep_id, TAG_JOB: str(context.number),
                     SWEEP_GROUP: sweep_group(about, context.sweep_id)})

    def open_run() -> str:
        parent = store.open_sweep(context.sweep_id, context.sweep_dir, about) if context.sweep_id is not None else None
        return store.open_job(opened, run_name(plan, list(context.overrides), context.number, opened.run_name),
                              parent, tags)

    return _unless_down(open_run, run, context)


def _finish(run: RunConfig, context: JobContext, store: Guarded | None, run_id: str | None,
            result: JobResult) -> None:
    """The job's files first (a stop waits for them), then its run in the store, unless the store is down."""
    redact_result(result)
    if run_id is not None:
        result.environment[RUN_ID] = run_id
    try:
        with held():
            files = _write_job_files(context.output_dir, run, result) + _job_charts(context.output_dir, result)
            files += [context.output_dir / name for name in result.artifacts]  # written by the job (snapshot=true)
        if store is not None and run_id is not None:
            store.finish_job(run_id, result, files)
        elif store is not None and store.down is not None:  # its run could not be opened
            _mark(run, context, store.down)
    except StoreDown as down:
        _said(down, run, context)
        _mark(run, context, down.reason)
    except KeyboardInterrupt:
        if store is not None:
            _mark(run, context, STOPPED)
        raise


T = TypeVar("T")


def _unless_down(call: Callable[[], T], run: RunConfig, context: JobContext) -> T | None:
    """A store call's answer, or None once the store is down (said in one line the first time)."""
    try:
        return call()
    except StoreDown as down:
        _said(down, run, context)
        return None


def _said(down: StoreDown, run: RunConfig, context: JobContext) -> None:
    if down.first:
        print(f"[sweepbp] warning: the tracking store {redact_uri(run.cfg.tracking.uri)} failed ({down.reason}); "
              "the jobs go on and write their results.json, and the runs it misses are added later by: "
              f"{sync_command(_folder(context))}", file=sys.stderr, flush=True)


def _mark(run: RunConfig, context: JobContext, reason: str) -> None:
    mark_not_in_store(context.output_dir, redact_uri(run.cfg.tracking.uri), reason, sync_command(_folder(context)))


def _say_not_in_store(context: JobContext) -> None:
    line = missing_runs_line(_folder(context))
    if line:
        print(line, file=sys.stderr, flush=True)


def _folder(context: JobContext) -> Path:
    """What the sync command is given: the sweep folder, or a single run's job folder."""
    return context.sweep_dir if context.sweep_dir is not None else context.output_dir


def _write_job_files(folder: Path, run: RunConfig, result: JobResult) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    config_path.write_text(config_yaml(run.cfg))
    return [result.write(folder), config_path]


def _job_charts(folder: Path, result: JobResult) -> list[Path]:
    """memory_timeline.png of the traced step, drawn in the sweep process: about 0.3-0.4 s of CPU per job,
    plus about 0.9 s once per sweep to import matplotlib (measured on a loaded 2-core VM, docs/report.md)."""
    if not result.timeline:
        return []
    try:
        from sweepbp.report.charts import memory_timeline_chart  # matplotlib: when the first picture is drawn

        path = memory_timeline_chart(result.timeline, folder / "memory_timeline.png", result.run_name,
                                     _twin_layers(result))
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


def _skipped(run: RunConfig, context: JobContext, store: Guarded, digest: str) -> JobResult | None:
    """resume=true: reuse the recorded result of an identical finished job instead of running it again (None:
    there is none, or the store cannot say: the job runs)."""
    previous = _unless_down(lambda: store.find_finished(digest), run, context)
    try:
        result = _unless_down(lambda: store.result_of(previous), run, context) if previous is not None else None
    except StoreError:  # its results.json is gone: the job runs again
        return None
    if result is None:
        return None
    result.environment["resumed_from_run_id"] = previous
    result.write(context.output_dir)
    print(f"[sweepbp] job {context.label}: already recorded as run {previous} "
          f"({result.status}), skipped (resume=true)", file=sys.stderr)
    return result


_stores: dict[tuple[str, str, str], Guarded | None] = {}


def _store(run: RunConfig) -> Guarded | None:
    """One store per backend, URI and experiment in this process (opened by its first call): the jobs of a
    sweep share its connection, and once it has failed none of them waits on it again."""
    tracking = run.cfg.tracking
    key = (tracking.name, tracking.uri, tracking.experiment)
    if key not in _stores:
        _stores[key] = None if tracking.name == NONE else Guarded(lambda: open_store(tracking))
    return _stores[key]


def _print_outcome(result: JobResult, context: JobContext) -> None:
    """One job's answer in the terminal: its status and the metrics the report's table shows, plus the loss; a
    prediction's figures are their `predicted_` twins."""
    shown = [next(c for c in (name, PREDICTED + name) if c in result.metrics)
             for name in (*metrics.shown(Shown.TABLE), "loss") if {name, PREDICTED + name} & result.metrics.keys()]
    parts = [f"status={result.status}", *(f"{name}={_terminal(name, result.metrics[name])}" for name in shown)]
    if result.error:
        parts.append(f"error={result.error}")
    if "prediction_error" in result.environment:  # a measured job's prediction failed: its record has no twins
        parts.append(f"prediction_error={result.environment['prediction_error']}")
    print(f"[sweepbp] {' '.join(parts)}\n[sweepbp] results: {context.output_dir / 'results.json'}", file=sys.stderr)


def _terminal(name: str, value: float) -> str:
    """A figure as the terminal line shows it: whole bytes, rates and counts with separators, the rest to 4
    decimals."""
    return f"{value:,.0f}" if metrics.unit(name) in ("bytes", "tokens/s", "sequences/s", "count") else f"{value:.4f}"
