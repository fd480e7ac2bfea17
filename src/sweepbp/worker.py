"""Per-job isolation: each job runs in a child forked from the sweep process.

The sweep process imports torch, Lightning, transformers and peft once but never runs a torch op or
touches CUDA, so a fork costs milliseconds and each job starts from the same clean state: no allocator
history, no leaked tensors, no exception frames from an earlier job. The child sends its JobResult back
as JSON and leaves with os._exit, so nothing of the parent (an MLflow connection) is torn down by it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable

from sweepbp.config import RunConfig
from sweepbp.result import JobResult

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
    """Run one job in a forked child; Ctrl-C/SIGTERM reach it and come back as status `killed`."""
    preload(run.cfg.model.arch)
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(sender, run, label), name=f"sweepbp-{label}")
    child.start()
    sender.close()
    previous = signal.signal(signal.SIGTERM, _forward_term(child.pid))
    try:
        return _receive(receiver, child, run)
    except KeyboardInterrupt:
        _signal(child.pid, signal.SIGTERM)
        result = _receive(receiver, child, run, timeout=GRACE_S)
        if result.status not in ("killed",):
            result.status, result.error = "killed", "interrupted (Ctrl-C or SIGTERM)"
        raise JobInterrupted(result) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        child.join(timeout=GRACE_S)
        if child.is_alive():
            child.kill()
            child.join()


class JobInterrupted(KeyboardInterrupt):
    """The sweep was interrupted during a job; carries that job's result so it can be recorded."""

    def __init__(self, result: JobResult):
        super().__init__("interrupted")
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


def _forward_term(pid: int) -> Callable:
    def handler(signum, frame):
        _signal(pid, signal.SIGTERM)
        raise KeyboardInterrupt

    return handler


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _child_main(sender, run: RunConfig, label: str) -> None:
    from sweepbp.job import Interrupted, run_job
    from sweepbp.progress import ProgressLine

    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
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
