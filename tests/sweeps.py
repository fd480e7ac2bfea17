"""Helpers of the failure tests: jobs in a clean process, sweeps as real subprocesses, the store read back.

Why a forkserver for in-process jobs: once a process has run a multi-threaded torch op, a fork of it hangs
in its first parallel op (GNU OpenMP's thread pool does not survive fork; try it: matmul, fork, matmul).
Other tests run torch in the pytest process, so a test that needs a job run in a clean process must not
fork pytest: it forks a forkserver that was started fresh and has only imported the libraries.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
TESTS = Path(__file__).resolve().parent
FAULTY = TESTS / "faulty_sweepbp.py"
PRELOAD = ["torch", "lightning.pytorch", "transformers", "peft", "sweepbp.job", "sweepbp.train.module", "sweepbp.train.model",
           "sweepbp.train.lora", "sweepbp.memory", "transformers.models.llama.modeling_llama", "conftest"]
# Tiny and short: warm-up step, traced step, one timed step. batch.size is set by each test.
SMALL = ["trainer.steps=3", "trainer.warmup_steps=1", "batch.seq_len=16"]


def in_clean_process(fn: Callable[..., T], *args, timeout: float = 300) -> T:
    """`fn(*args)` in a fresh process forked from a clean forkserver; its return value comes back pickled."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # only takes effect when the forkserver starts (once)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result(timeout=timeout)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a sweep subprocess: this tree first on PYTHONPATH, quiet progress."""
    env = {**os.environ, "CI": "1", "HYDRA_FULL_ERROR": "0", **(extra or {})}
    env.pop("MLFLOW_RUN_ID", None)
    return env


@dataclass
class Sweep:
    """A sweep running in a subprocess, in its own process group, with stdout/stderr in files."""

    process: subprocess.Popen
    folder: Path

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr.txt").read_text()

    def signal_group(self, signum: int) -> None:
        """What a terminal does on Ctrl-C (SIGINT) or what `kill -9 -PGID` does: every process of the sweep."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:  # the sweep has already ended
            pass

    def wait_for_file(self, path: Path, timeout: float) -> str:
        """The text of `path` once it has some; fails if the sweep ends first or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text():
                return path.read_text()
            if self.process.poll() is not None:
                raise AssertionError(f"the sweep ended (exit {self.process.returncode}) before {path.name} "
                                     f"appeared:\n{self.stderr[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"{path.name} did not appear within {timeout} s:\n{self.stderr[-3000:]}")

    def finish(self, timeout: float) -> int:
        """The exit code, waiting at most `timeout` s (then the whole group is killed and the test fails)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the sweep did not end within {timeout} s:\n{self.stderr[-3000:]}") from None

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def start_sweep(args: list[str], folder: Path, env: dict[str, str] | None = None, faulty: bool = True,
                multirun: bool = True) -> Sweep:
    """`python -m sweepbp -m ARGS` (or the fault-injecting wrapper of it) started in `folder`."""
    command = [sys.executable, str(FAULTY)] if faulty else [sys.executable, "-m", "sweepbp"]
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        process = subprocess.Popen([*command, *(["-m"] if multirun else []), *args], cwd=folder, env=cli_env(env),
                                   start_new_session=True, stdout=out, stderr=err)
    return Sweep(process, folder)


def run_sweep(args: list[str], folder: Path, env: dict[str, str] | None = None, faulty: bool = False,
              timeout: float = 300) -> tuple[int, str]:
    """Run a sweep to its end: (exit code, stderr)."""
    sweep = start_sweep(args, folder, env, faulty)
    code = sweep.finish(timeout)
    return code, sweep.stderr


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group: what a sweep started in its own session leaves."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if (fields := _stat(pid)) and fields[0] != "Z" and int(fields[2]) == pgid]


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def runs_of(folder: Path) -> tuple[list, list]:
    """(job runs, sweep parent runs) of the sweepbp experiment in `folder`/mlflow.db, oldest first."""
    from mlflow.tracking import MlflowClient

    if not (folder / "mlflow.db").exists():  # opening a store would create it
        return [], []
    client = MlflowClient(tracking_uri=store_uri(folder))
    experiment = client.get_experiment_by_name("sweepbp")
    if experiment is None:
        return [], []
    runs = client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("sweepbp.role") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("sweepbp.role") != "sweep"]
    return jobs, parents


def artifact_json(folder: Path, run) -> dict:
    """results.json as logged to the run (read back through MLflow)."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri(folder))
    return json.loads(Path(client.download_artifacts(run.info.run_id, "results.json")).read_text())


def sweep_dirs(folder: Path) -> list[Path]:
    """Sweep folders under `folder`/multirun, oldest first."""
    return sorted(p.parent for p in (folder / "multirun").glob("*/*/multirun.yaml"))
