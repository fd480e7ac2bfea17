"""`python -m sweepbp.rerun RUN_ID`: run again exactly the config an MLflow run recorded, from the store alone.

The run's `config.yaml` artifact (the fully resolved config) and its group choices (params) are read
back, typed and validated like a composed config, and run as one job. The new run lands in the same
store and experiment, tagged `sweepbp.rerun_of=RUN_ID`; the loss curves are compared at the end
(on CPU they are identical: the seed fixes weights, adapter and data).

    python -m sweepbp.rerun 3f2a... [--tracking-uri sqlite:///mlflow.db] [--out DIR] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sweepbp.config import (
    SCHEMAS,
    ConfigError,
    SweepbpConfig,
    TrackingConfig,
    redact_uri,
    register_schemas,
    schema_of,
    to_run_config,
)
from sweepbp.result import Status
from sweepbp.sweep.signals import stop_on_signals, stopped_exit_code
from sweepbp.sweep.task import JobContext, record_job
from sweepbp.tracking import BACKENDS, NONE, RUN_ID, StoreError, backend, open_store
from sweepbp.tracking.uris import sqlite_path


def typed_config(text: str) -> DictConfig:
    """A recorded config.yaml as a structured config: each group typed by the schema of its option
    (memory.name=ckpt -> CkptMemoryConfig), so validation and defaults work as after composition."""
    loaded = OmegaConf.create(text)
    base = OmegaConf.structured(SweepbpConfig)
    for group in SCHEMAS:
        base[group] = OmegaConf.structured(schema_of(group, OmegaConf.select(loaded, f"{group}.name")))
    return OmegaConf.merge(base, loaded)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweepbp.rerun",
                                     description="Rerun exactly the config an MLflow run recorded.")
    parser.add_argument("run_id", help="the MLflow run to reproduce")
    parser.add_argument("--tracking", default="mlflow", choices=list(BACKENDS),
                        help="the tracking backend that holds the run (default: %(default)s)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow store holding the run, where the rerun is recorded too (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="job folder (default: outputs/rerun-RUN_ID)")
    parser.add_argument("--no-record", action="store_true", help="write results.json only, record no MLflow run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Rerun one recorded run; exit 0 when it finished ok."""
    args = parse_args(argv)
    uri = backend(args.tracking).resolve(args.tracking_uri)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():  # opening it would make an empty store here
        print(f"sweepbp.rerun: error: no MLflow store at {database} (run from the sweep's folder, or give it with "
              "--tracking-uri)", file=sys.stderr)
        return 1
    try:
        recorded = open_store(TrackingConfig(name=args.tracking, uri=uri)).recorded_run(args.run_id)
    except StoreError as err:
        print(f"sweepbp.rerun: error: {err} (store {redact_uri(uri)})", file=sys.stderr)
        return 1
    register_schemas()
    cfg = typed_config(recorded.config_text)
    cfg.tracking.uri = uri  # record next to the original, whatever folder the original ran from
    cfg.tracking.name = NONE if args.no_record else args.tracking
    cfg.resume = False  # a rerun runs, even though an identical run finished
    try:
        run = to_run_config(cfg, recorded.choices)
    except ConfigError as err:
        print("\n".join(f"sweepbp.rerun: error: {line}" for line in err.problems), file=sys.stderr)
        return 2
    out = args.out or Path("outputs") / f"rerun-{args.run_id}"
    try:
        result = record_job(run, JobContext(out, None, None, 0, 1, tags={"sweepbp.rerun_of": args.run_id}))
    except KeyboardInterrupt as stop:  # record_job has recorded the rerun as killed before re-raising
        where = "" if run.cfg.tracking.name != NONE else f" in {out / 'results.json'} only (not tracked)"
        return stopped_exit_code(stop, f"sweepbp.rerun: stopped ({stop}): the rerun is recorded as killed{where}")
    new_id = result.environment.get(RUN_ID)
    print(f"[sweepbp] rerun of {args.run_id}: status={result.status}, run {new_id or '(not recorded)'}, "
          f"results in {out / 'results.json'}", file=sys.stderr)
    print(f"[sweepbp] {loss_comparison(recorded.losses, result.losses)}", file=sys.stderr)
    return 0 if result.status == Status.OK else 1


def loss_comparison(original: list[float] | None, new: list[float]) -> str:
    """One line: whether the rerun's loss curve equals the recorded one."""
    if original is None:
        return "no recorded loss curve to compare with"
    if original == new:
        return f"loss curve identical to the recorded one ({len(new)} steps)"
    if len(original) != len(new):
        return f"loss curve differs: {len(new)} steps against {len(original)} recorded"
    worst = max(abs(a - b) for a, b in zip(original, new))
    return f"loss curve differs from the recorded one by at most {worst:.3g} (e.g. GPU nondeterminism)"


def command_line() -> int:
    """`python -m sweepbp.rerun`: Ctrl-C or SIGTERM ends it with one line (a started rerun is recorded as
    killed, as in a sweep) and the shell's exit code 128 + signal."""
    stop_on_signals()
    try:
        return main()
    except KeyboardInterrupt as stop:  # before the job started (main handles a stop during it)
        return stopped_exit_code(stop, f"sweepbp.rerun: stopped ({stop}): before the rerun started")


if __name__ == "__main__":
    raise SystemExit(command_line())
