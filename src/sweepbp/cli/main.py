"""`python -m sweepbp`: check the whole sweep's configs, then hand over to Hydra.

Before Hydra launches anything, every job of the sweep is composed and validated (cli/precheck.py) with
nothing heavy imported, and the fork server that pre-imports the jobs' libraries is started as soon as the
first job validates, so its imports overlap with checking the rest.
"""

from __future__ import annotations

import os
import sys

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

from sweepbp.cli.paths import config_dir
from sweepbp.cli.precheck import MAX_PRECHECKED_JOBS, launcher_of, notes, precheck
from sweepbp.cli.suggest import unknown_flags
from sweepbp.config import GROUPS, RunConfig, needs_bitsandbytes, register_schemas
from sweepbp.report.naming import PLAN_ENV, SweepPlan
from sweepbp.sweep.signals import stop_on_signals, stopped_exit_code
from sweepbp.tracking.redaction import install_log_redaction
from sweepbp.tracking.uris import move_credentials


MULTIRUN_FLAGS = ("-m", "--multirun")


def main(argv: list[str] | None = None) -> None:
    args = multirun_first(sys.argv[1:] if argv is None else argv)
    stop_on_signals()  # SIGTERM stops a sweep as cleanly as Ctrl-C
    install_log_redaction()
    try:
        _main(args)
    except KeyboardInterrupt as stop:
        raise SystemExit(stopped_exit_code(stop, (
            f"sweepbp: stopped ({stop}): the job that was running is recorded as killed, finished jobs are kept; "
            "rerun the same command with resume=true to run the rest"))) from None


def _main(args: list[str]) -> None:
    if "--version" in args:  # before Hydra's parser, whose --version is Hydra's own
        from sweepbp.cli.usage import version_text

        print(version_text())
        return
    register_schemas()
    if _wants_help(args):
        from sweepbp.cli.usage import help_text  # --help only: one composition, no launch

        print(help_text(get_args_parser().parse_args(args).overrides))
        return
    said: list[str] = []
    runs: list[RunConfig] = []
    problems, jobs = unknown_flags(args), 0
    if not problems:
        problems, jobs = precheck(args, on_first_valid=_start_workers_early, notes=said, runs=runs)
    if problems:
        _stop_workers_if_started()
        for line in problems:
            print(f"sweepbp: error: {line}", file=sys.stderr)
        raise SystemExit(2)
    parsed = get_args_parser().parse_args(args)
    for line in [*notes(parsed.overrides), *said]:
        print(f"sweepbp: note: {line}", file=sys.stderr)
    os.environ["SWEEPBP_SWEEP_SIZE"] = str(jobs)
    if parsed.multirun:  # the parent run's name and params, for whichever job opens it (report/naming.py)
        os.environ[PLAN_ENV] = SweepPlan.of(parsed.overrides, jobs).to_env()
    if 0 < jobs <= MAX_PRECHECKED_JOBS:
        from hydra_plugins.sweepbp_sweeper import PRECHECKED  # Hydra's sweeper: only for a sweep that runs

        os.environ[PRECHECKED] = "1"  # every job composed and validated: the sweeper need not check them again
    hydra_args = credentials_to_environment(args)
    sys.argv = [sys.argv[0], *(fields_of_swept_groups(hydra_args) if parsed.multirun else hydra_args)]
    _allow_bitsandbytes_if_used(runs)
    if _started_workers and len(runs) == jobs:
        from sweepbp.sweep.worker import prefetch_predictions  # as for start_workers: only for a sweep that runs

        prefetch_predictions(runs)  # the jobs run in this process: their predictions can start now
    import hydra  # the whole of Hydra and the sweep's task: only once every job is valid (errors stay fast)

    from sweepbp.sweep.task import run_task

    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(run_task)()


def multirun_first(args: list[str]) -> list[str]:
    """`-m` moved before the overrides: Hydra's parser takes the overrides as one run of positional arguments,
    so `a=1 -m b=1,2` would leave `b=1,2` unrecognised. The flag takes no value, so moving it changes nothing else."""
    flags = [a for a in args if a in MULTIRUN_FLAGS]
    return [*flags, *(a for a in args if a not in MULTIRUN_FLAGS)]


def credentials_to_environment(args: list[str]) -> list[str]:
    """`tracking.uri=http://user:password@host` becomes `tracking.uri='http://host'`, the credentials going to
    MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in this process's environment (which the
    jobs and launcher workers inherit): what Hydra writes (.hydra/*.yaml, override_dirname), logs and hands to
    the jobs then never holds them, nor do MLflow's printed links or error messages. A swept URI is left to
    the redaction of everything shown or written (tracking/redaction.py)."""
    parser = OverridesParser.create()
    return [_without_credentials(arg, parser) if arg.lstrip("+").startswith("tracking.uri=") else arg for arg in args]


def fields_of_swept_groups(args: list[str]) -> list[str]:
    """`memory.every=2` beside `memory=selective,ckpt` becomes `memory.every=choice(2)`: Hydra composes a sweep's
    base config with its swept overrides left out, so a field that only the swept options have (`every` is not
    in the default memory=none) failed that composition before any job ran. As a one-value sweep it is left
    out too, and every job still gets `memory.every=2` (pre-flight checked each job with it)."""
    parser = OverridesParser.create()
    parsed = {arg: parser.parse_override(arg) for arg in args if "=" in arg}
    swept = {o.key_or_group for o in parsed.values() if o.is_sweep_override() and o.key_or_group in GROUPS}

    def in_swept_group(arg: str) -> bool:
        override = parsed.get(arg)
        if override is None or arg.startswith(("+", "~")) or override.is_sweep_override():
            return False
        group, dot, _ = override.key_or_group.partition(".")
        return bool(dot) and group in swept and arg.split("=", 1)[1] != ""

    return [f"{arg.split('=', 1)[0]}=choice({arg.split('=', 1)[1]})" if in_swept_group(arg) else arg for arg in args]


def _without_credentials(arg: str, parser: OverridesParser) -> str:
    override = parser.parse_override(arg)  # pre-flight parsed it already: it parses
    if override.is_sweep_override():
        return arg
    uri, credentials = move_credentials(override.value())
    if not credentials:
        return arg
    os.environ.update(credentials)
    quoted = uri.replace("\\", "\\\\").replace("'", "\\'")  # a quoted value in Hydra's override grammar
    return f"{arg.split('=', 1)[0]}='{quoted}'"


def _wants_help(args: list[str]) -> bool:
    return any(a in ("--help", "-h") for a in args)


_started_workers = False


def _start_workers_early(run: RunConfig, overrides: list[str]) -> None:
    """Jobs of the basic launcher run in this process: start their pre-importing worker now."""
    global _started_workers
    if launcher_of(overrides) != "basic":
        return  # the jobs run in other processes, which start their own worker
    from sweepbp.sweep.worker import start_workers  # multiprocessing and the rank merge: not for --help or errors

    measured = not predictions_only(run, overrides)
    # a measured job imports bitsandbytes as the libraries do in any run (its host memory counts it)
    start_workers(run.cfg.model.arch, measured=measured,
                  bitsandbytes=measured or run.cfg.uses_bitsandbytes or sweeps_bitsandbytes_options(overrides))
    _started_workers = True


def sweeps_bitsandbytes_options(overrides: list[str]) -> bool:
    """Whether a command line sweeps an option that needs bitsandbytes (a quant other than none, an 8-bit optimizer)
    or a field of those groups: its first job does not tell then whether another will."""
    for override in _parsed(overrides):
        group = override.key_or_group.split(".")[0]
        if not override.is_sweep_override() or group not in ("quant", "optim"):
            continue
        if "." in override.key_or_group:
            return True
        if any(needs_bitsandbytes(group, str(value)) for value in override.sweep_string_iterator()):
            return True
    return False


def _allow_bitsandbytes_if_used(runs: list[RunConfig]) -> None:
    """A job of the sweep needs bitsandbytes, which the fork server started for its first job keeps out (an option
    file the command line did not name chose it): the server is replaced before any job runs."""
    if _started_workers and any(run.cfg.uses_bitsandbytes for run in runs):
        from sweepbp.sweep.worker import allow_bitsandbytes

        allow_bitsandbytes()


def predictions_only(run: RunConfig, overrides: list[str]) -> bool:
    """Whether every job of a command line is a prediction: its first job is, and `mode` is not swept."""
    return run.cfg.mode == "predict" and not any(o.key_or_group == "mode" and o.is_sweep_override()
                                                 for o in _parsed(overrides))


def _parsed(overrides: list[str]) -> list[Override]:
    """The command line's `key=value` overrides, parsed (pre-flight has parsed them all already: they parse)."""
    parser = OverridesParser.create()
    return [parser.parse_override(o) for o in overrides if "=" in o]


def _stop_workers_if_started() -> None:
    if _started_workers:
        from sweepbp.sweep.worker import stop_workers

        stop_workers()
