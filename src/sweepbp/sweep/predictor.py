"""The prediction process: the predictions of a sweep, one after another in one long-lived job process.

A prediction needs no isolation (its tensors are meta tensors: no device memory, no timing), so the sweep
hands all of them to one process (forked like any job, see worker.py) instead of starting a process each.
The command line knows every job of the sweep before the first starts (it validated them all), so it
announces them (`prefetch`); the process then predicts them in that order while the sweep process composes
and records, and a job's request finds its result ready. A job asked for before its turn is predicted next.
Every result is made by the job's own `run_job`, so each record is what the job would have recorded alone.

Predictions run in the process's main thread (where signals arrive); a second thread reads the sweep's
messages and answers a request as soon as its result is ready, also while the next prediction runs.
Stops: a signal interrupts the prediction it reaches (run_job records it `killed`); the process then answers
the request the sweep waits for, if any (its result if ready, else `killed`), and ends. It also ends when the
sweep closes its connection.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from sweepbp.config import RunConfig
from sweepbp.result import JobResult, Status

STOP_GRACE_S = 60.0  # after a stop, how long the process waits for the request the sweep may still send
# the sweep's messages: (PREFETCH, runs, environ) and (RUN, run, environ, the job's folder)
PREFETCH, RUN = "prefetch", "run"


Job = tuple[RunConfig, dict[str, str], Path | None]  # a prediction to make: config, environment, folder


def use_environment(environ: dict[str, str]) -> None:
    """Run as if started now by the sweep process: its environment (a forked process keeps the one it had)."""
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)


def config_key(run: RunConfig) -> str:
    """What makes two jobs the same prediction: the validated config and the options it came from, but where it
    is recorded (the command line moves a URI's credentials to the environment after announcing the jobs). The
    config's repr: its values with their types, in their order (pre-flight's config of a job and the launch's are
    the same composition: tests/test_config.py compares them); a fraction of a millisecond where its JSON took
    10-15 ms. Two configs that differ only in a dict's order would be predicted twice, never mixed up."""
    unrecorded = dataclasses.replace(run.cfg, tracking=None, resume=False)
    return repr((unrecorded, sorted((k, v) for k, v in run.choices.items() if k != "tracking")))


# Variables the sweep process's own libraries set after announcing the jobs, which no prediction reads: MLflow's
# (its settings, and _MLFLOW_TELEMETRY_SESSION_ID, which it sets on import where telemetry is on) and
# MPLCONFIGDIR (matplotlib sets it to a temporary folder when the home's config folder is not writable).
SWEEP_SIDE_PREFIXES = ("MLFLOW_", "_MLFLOW_")
SWEEP_SIDE_NAMES = frozenset({"MPLCONFIGDIR"})


def job_environment(environ: dict[str, str]) -> dict[str, str]:
    """What of the sweep's environment a prediction may depend on: all but what the sweep's own libraries set
    for themselves. Were one of those compared, every prediction made ahead after it was set would be dropped and
    made again on request."""
    return {k: v for k, v in environ.items() if not k.startswith(SWEEP_SIDE_PREFIXES) and k not in SWEEP_SIDE_NAMES}


def as_asked(answer: str, made_for: RunConfig, run: RunConfig) -> str:
    """A result made for an announced job, as the job that asked for it records it (its tracking config)."""
    if made_for == run:
        return answer
    result = JobResult.from_json(answer)
    asked = JobResult.of(run, result.status)
    if (result.config, result.choices) == (asked.config, asked.choices):
        return answer
    result.config, result.choices = asked.config, asked.choices
    return result.to_json(indent=None)


class PredictionServer:
    """The process's side of the connection: predictions in the main thread, requests answered by a reader."""

    def __init__(self, connection: Connection, run_job: Callable[..., JobResult], interrupted: type[BaseException]):
        self.connection = connection
        self.run_job = run_job
        self.interrupted = interrupted
        self.changed = threading.Condition()  # guards everything below; notified on every message
        self.ahead: deque[Job] = deque()  # announced, not yet predicted
        self.wanted: dict[str, Job] = {}  # asked for, not yet answered
        # predicted, not asked for: key -> (JSON, environment, the job it was made for)
        self.ready: dict[str, tuple[str, dict[str, str], RunConfig]] = {}
        self.done: set[str] = set()  # answered: not predicted again when its announcement comes up
        self.closed = False  # the sweep closed its end

    def serve(self) -> None:
        """Predict what is asked for, else what is announced, until the sweep closes the connection or a stop."""
        threading.Thread(target=self._read, name="sweepbp-requests", daemon=True).start()
        try:
            while (job := self._next()) is not None:
                key, (run, environ, folder) = job
                use_environment(environ)
                result = self.run_job(run, output_dir=folder)
                with self.changed:
                    self.ready[key] = (result.to_json(indent=None), job_environment(environ), run)
                    self._answer(key)
                    answered = key in self.done
                if result.status == Status.KILLED:  # a stop reached it: the sweep is ending
                    if answered:
                        return  # the sweep waited for this one: the stop is answered
                    raise self.interrupted()
        except self.interrupted:
            self._answer_after_stop()

    def _next(self) -> tuple[str, Job] | None:
        """The next prediction to make: a request first, else the next announced job; None once closed."""
        with self.changed:
            while not self.closed:
                if self.wanted:
                    return next(iter(self.wanted.items()))
                while self.ahead:
                    job = self.ahead.popleft()
                    key = config_key(job[0])
                    if key not in self.ready and key not in self.done:
                        return key, job
                self.changed.wait()
            return None

    def _read(self) -> None:
        """The reader thread: announcements queue up, requests are answered at once when their result is ready."""
        try:
            while True:
                message = self.connection.recv()
                with self.changed:
                    if message[0] == PREFETCH:
                        self.ahead.extend((run, message[2], None) for run in message[1])
                    else:
                        _, run, environ, folder = message
                        key = config_key(run)
                        self.wanted[key] = (run, environ, folder)
                        self._answer(key)
                    self.changed.notify()
        except Exception:  # noqa: BLE001 (the end of input, or a message cut short: no more requests either way)
            with self.changed:
                self.closed = True
                self.changed.notify()

    def _answer(self, key: str) -> None:
        """Send the result of a request once both the request and its result are there (holding the lock). A
        result made in another environment than the request's is dropped: the request is then predicted anew."""
        if key not in self.wanted or key not in self.ready:
            return
        run, environ, _ = self.wanted[key]
        answer, made_in, made_for = self.ready.pop(key)
        if made_in != job_environment(environ):
            return
        del self.wanted[key]
        self.done.add(key)
        self.connection.send(as_asked(answer, made_for, run))

    def _answer_after_stop(self) -> None:
        """The request the sweep waits for, if it comes within the grace period: its result if ready, else
        `killed` (the prediction never started)."""
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            with self.changed:
                while not self.wanted and not self.closed and time.monotonic() < deadline:
                    self.changed.wait(timeout=max(0.0, deadline - time.monotonic()))
                for key, (run, environ, _) in list(self.wanted.items()):
                    self.ready.setdefault(key, (JobResult.of(
                        run, Status.KILLED, "interrupted (Ctrl-C or SIGTERM) before the prediction started"
                    ).to_json(indent=None), job_environment(environ), run))
                    self._answer(key)
        except (self.interrupted, OSError):  # a second signal, or the sweep gone: nothing left to answer
            return
