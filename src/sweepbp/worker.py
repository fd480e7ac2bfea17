"""Per-job isolation: each job runs in a child forked from the sweep process.

The sweep process imports torch, Lightning, transformers and peft once but never runs a torch op or
touches CUDA, so a fork costs milliseconds and each job starts from the same clean state: no allocator
history, no leaked tensors, no exception frames from an earlier job. The child sends its JobResult back
as JSON and leaves with os._exit, so nothing of the parent (an MLflow connection) is torn down by it.

Ctrl-C or SIGTERM stops the child through its own handler (status `killed`, with what it measured so far)
and the sweep re-raises it as `JobInterrupted` once that partial result is back; see signals.py. The child
dies with the sweep process. Forking also works from a joblib (loky) worker, which runs no torch op either;
it does not work from a process that has run a multi-threaded torch op (GNU OpenMP's pool does not survive
a fork, and the child hangs in its first parallel op).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback

from sweepbp.config import RunConfig
from sweepbp.result import JobResult
from sweepbp.signals import STOP_SIGNALS, Stopped, die_with_parent, ignore_signals, raise_once, stopping

GRACE_S = 60.0  # how long an interrupted child may take to hand back its partial result


def preload(arch: str) -> None:
    """Import the heavy libraries once in the sweep process, so each forked job starts in milliseconds.

    Nothing here runs a torch op or initialises CUDA (a forked child could not use CUDA otherwise);
    PYTORCH_NVML_BASED_CUDA_CHECK keeps Lightning's device queries off the CUDA driver.
    """
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import importlib

    import sweepbp.job  # noqa: F401
    import sweepbp.lora  # noqa: F401
    import sweepbp.memory  # noqa: F401
    import sweepbp.model  # noqa: F401
    import sweepbp.module  # noqa: F401

    try:  # the model family's modeling code, which transformers imports lazily
        importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    except ImportError:
        pass
    from sweepbp.predict import warm_up

    warm_up()  # every job predicts its memory; on meta tensors, so no CUDA and no allocator is touched


def run_isolated(run: RunConfig, label: str) -> JobResult:
    """Run one job in a forked child. Ctrl-C/SIGTERM reach it and come back as `JobInterrupted`,
    which carries the child's partial result with status `killed`."""
    preload(run.cfg.model.arch)
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(sender, run, label, os.getpid()), name=f"sweepbp-{label}")
    with stopping():
        try:
            child.start()
            sender.close()
            return _receive(receiver, child, run)
        except KeyboardInterrupt as stop:
            ignore_signals()  # a second Ctrl-C must not cut the partial result off (stopping() keeps this)
            if child.pid is not None:
                _signal(child.pid, signal.SIGTERM)
                result = _receive(receiver, child, run, timeout=GRACE_S)
            else:
                result = _lost(run, "interrupted before the job started")
            if result.status != "killed":
                result.status, result.error = "killed", result.error or "interrupted (Ctrl-C or SIGTERM)"
            raise JobInterrupted(result, getattr(stop, "signum", signal.SIGINT)) from None
        finally:
            if child.pid is not None:
                child.join(timeout=GRACE_S)
                if child.is_alive():
                    child.kill()
                    child.join()


class JobInterrupted(Stopped):
    """The sweep was stopped during a job; carries that job's result so it can be recorded."""

    def __init__(self, result: JobResult, signum: int):
        super().__init__(signum)
        self.result = result


def _receive(receiver, child, run: RunConfig, timeout: float | None = None) -> JobResult:
    if timeout is not None and not receiver.poll(timeout):
        return _lost(run, "the job did not stop within the grace period")
    try:
        return JobResult.from_json(receiver.recv())
    except EOFError:
        child.join(timeout=5)
        code = child.exitcode
        if code == -signal.SIGKILL:
            # The kernel's out-of-memory killer sends SIGKILL: the host ran out of memory.
            result = _lost(run, "the job process was killed (SIGKILL), most likely by the host's out-of-memory killer")
            result.status = "oom"
            return result
        return _lost(run, f"the job process died with exit code {code}")


def _lost(run: RunConfig, why: str) -> JobResult:
    from sweepbp.config import config_as_dict

    return JobResult(status="failed", mode=run.cfg.mode, config=config_as_dict(run.cfg), choices=run.choices,
                     error=why)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _child_main(sender, run: RunConfig, label: str, parent_pid: int) -> None:
    from sweepbp.job import Interrupted, run_job
    from sweepbp.progress import ProgressLine

    die_with_parent(parent_pid)
    interrupt = raise_once(Interrupted)
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)
    code = 0
    try:
        result = run_job(run, progress=ProgressLine(label, run))
        sender.send(result.to_json())
    except BaseException:  # a bug in sweepbp itself: still hand back a record
        traceback.print_exc()
        code = 1
        try:
            sender.send(_lost(run, traceback.format_exc().strip().splitlines()[-1]).to_json())
        except BaseException:
            pass
    finally:
        sender.close()
        os._exit(code)
