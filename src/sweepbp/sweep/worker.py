"""Per-job isolation: each job runs in its own freshly forked process.

Jobs are forked from a pre-imported worker (a multiprocessing fork server) that imports torch,
Lightning, transformers and peft once, but never runs a torch op or touches CUDA. A fork costs
milliseconds and each job starts from the same clean state: no allocator history, no leaked tensors,
no exception frames from an earlier job. The fork server is a separate process, so its imports run on
one core while the sweep process composes configs and opens the tracking store on another; the sweep
process itself never imports torch. The child sends its JobResult back as JSON and leaves with
os._exit, so nothing of the parent is torn down by it.

Ctrl-C or SIGTERM stops the job through its own handler (status `killed`, with what it measured so far)
and the sweep re-raises it as `JobInterrupted` once that partial result is back; see signals.py. A job
dies with the process it was forked from (the fork server, which itself ends with the sweep process).
A fork of a process that has run a multi-threaded torch op hangs (GNU OpenMP's pool does not survive a
fork): neither the fork server nor the sweep process runs one.

`SWEEPBP_START_METHOD=fork` forks jobs from the sweep process itself instead (it then imports the heavy
libraries itself, once): the same isolation, without the overlap.

A prediction (mode=predict, one process) needs no isolation: it allocates no device memory (its tensors are
meta tensors) and measures no time. Predictions run one after another in one long-lived job process forked
the same way (`_Predictor`, sweep/predictor.py), which saves each a process start and predicts ahead while the
sweep process records; their records are made exactly as for any job.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from sweepbp.config import RunConfig
from sweepbp.result import JobResult, Status
from sweepbp.sweep.predictor import PREFETCH, RUN, PredictionServer, config_key, use_environment
from sweepbp.sweep.progress import ProgressLine
from sweepbp.sweep.ranks import free_port, merge_ranks, rank_environment
from sweepbp.sweep.signals import STOP_SIGNALS, Stopped, die_with_parent, ignore_signals, raise_once, stopping
from sweepbp.train.warmup import ARCH_VARIABLE, TRAINER_VARIABLE, warm

GRACE_S = 60.0  # how long an interrupted child may take to hand back its partial result


# sweepbp.job imports every module a job uses (train/, memory/, measure/, predict/) at its top; sweepbp
# itself first, so that its package init quiets bitsandbytes before peft imports it.
PRELOAD = ("sweepbp", "torch", "transformers", "peft", "sweepbp.job", "sweepbp.sweep.progress",
           "peft.utils.transformers_weight_conversion")
# what only a measured job imports: Lightning, its module, its Trainer warmed up (a sweep of predictions only
# never imports them, which saves its fork server 1.2-1.9 s of imports on a 2-core machine)
MEASURED_PRELOAD = ("lightning", "sweepbp.train.module")
# first in the preload of a fork server whose jobs are predictions that never use bitsandbytes: keeps it out
WITHOUT_BITSANDBYTES = "sweepbp.sweep.without_bitsandbytes"


def start_method() -> str:
    """forkserver (default) or fork, from SWEEPBP_START_METHOD. Inside a joblib (loky) worker jobs fork
    from the worker itself: a fork server started there cannot rebuild loky's start method."""
    if mp.get_start_method(allow_none=True) not in (None, "fork", "forkserver", "spawn"):
        return "fork"
    method = os.environ.get("SWEEPBP_START_METHOD", "forkserver")
    return method if method in ("fork", "forkserver") else "forkserver"


def preload_modules(arch: str, measured: bool = True, bitsandbytes: bool = True) -> list[str]:
    """What a job needs imported before it is forked: the libraries (Lightning only for `measured` jobs;
    bitsandbytes kept out unless `bitsandbytes`), the model family's modeling code, and last
    sweepbp.train.warmup, whose import warms them up on the meta device (see warmup.py)."""
    return [*(() if bitsandbytes else (WITHOUT_BITSANDBYTES,)), *PRELOAD, *(MEASURED_PRELOAD if measured else ()),
            f"transformers.models.{arch}.modeling_{arch}", "sweepbp.train.warmup"]


_stops_at_exit = False  # whether this process stops its fork server when it exits


@dataclass
class _Server:
    """The fork server this process started: its pid and what it was started for."""

    pid: int
    arch: str
    measured: bool
    bitsandbytes: bool


_server: _Server | None = None


def start_workers(arch: str, measured: bool = True, bitsandbytes: bool = True) -> None:
    """Start the pre-importing fork server now (idempotent, returns at once): its imports then overlap
    with whatever the sweep process does next. Jobs fork from it (see `run_isolated`). `measured=False`: the
    sweep's jobs are all predictions, which need no Lightning (a measured job would then import it itself).
    `bitsandbytes=False`: the sweep's jobs are predictions none of which uses it, and it is kept out of the server
    (1.0-1.6 s less to import on a 2-core machine, docs/performance.md); a job that needs it, and any measured job
    (whose host memory counts the libraries as a run of them would), calls `allow_bitsandbytes` first.

    The fork server never runs a torch op or initialises CUDA (a forked child could not use CUDA
    otherwise); PYTORCH_NVML_BASED_CUDA_CHECK keeps Lightning's device queries off the CUDA driver.
    """
    global _stops_at_exit, _server
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if start_method() == "fork":
        preload(arch, measured)  # into this very process, which may run any job later: bitsandbytes stays
        return
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(preload_modules(arch, measured, bitsandbytes))
    os.environ[ARCH_VARIABLE] = arch  # read by the fork server's import of sweepbp.train.warmup
    os.environ[TRAINER_VARIABLE] = "1" if measured else "0"
    try:
        forkserver.ensure_running()
    finally:
        del os.environ[ARCH_VARIABLE], os.environ[TRAINER_VARIABLE]
    pid = _server_pid()
    if pid is not None and (_server is None or _server.pid != pid):  # started now, with this call's preload
        _server = _Server(pid, arch, measured, bitsandbytes)
    if not _stops_at_exit:
        # A sweep that ends at once (resume with nothing to run, a stop at start) would otherwise leave the server
        # importing for seconds after it. Registered before the prediction process's `_end_at_exit`, so it runs
        # after it (atexit is last in, first out): that process ends by itself first.
        atexit.register(stop_workers)
        _stops_at_exit = True


def stop_workers() -> None:
    """Stop a fork server this process started (the sweep was refused after it was started, or has ended); the jobs
    forked from it die with it (signals.die_with_parent)."""
    pid = _server_pid()
    if pid is not None:
        _signal(pid, signal.SIGTERM)


def allow_bitsandbytes() -> None:
    """A job needs bitsandbytes: if the running fork server keeps it out, it is replaced by one that imports it
    (started at once, for the same jobs), and the prediction process forked from it is let go."""
    if start_method() == "fork" or _server is None or _server.bitsandbytes or _server_pid() != _server.pid:
        return
    _PREDICTOR.stop()
    stop_workers()
    forkserver._forkserver._stop()  # reaps it and forgets its address: the next start starts a new one
    start_workers(_server.arch, _server.measured, bitsandbytes=True)


def _server_pid() -> int | None:
    return getattr(forkserver._forkserver, "_forkserver_pid", None)  # 3.10-3.13: no public accessor


_preloaded: set[str] = set()


def preload(arch: str, measured: bool = True) -> None:
    """Import the heavy libraries into this process and warm them up (SWEEPBP_START_METHOD=fork)."""
    if arch in _preloaded:
        return
    _preloaded.add(arch)

    for name in preload_modules(arch, measured):
        try:
            importlib.import_module(name)
        except ImportError:  # an arch without its own modeling module: imported lazily by the job
            pass
    try:
        warm(arch, measured)
    except Exception:  # the jobs only lose the head start
        pass


def run_isolated(run: RunConfig, label: str, output_dir: Path | None = None) -> JobResult:
    """Run one job in freshly forked children, one per rank (one for a single-device job), or a prediction in
    the long-lived prediction process, in its folder `output_dir` (where it writes files of its own,
    `JobResult.artifacts`). Ctrl-C/SIGTERM reach them and come back as `JobInterrupted`, which carries the
    partial result with status `killed`."""
    if run.cfg.uses_bitsandbytes or not _in_predictor(run):  # a measured job always imports it, as any run would
        allow_bitsandbytes()
    start_workers(run.cfg.model.arch, measured=not _in_predictor(run))
    ranks: list[_Rank] = []
    with stopping():
        try:
            if _in_predictor(run):
                ranks.append(_PREDICTOR.submit(run, output_dir))
            else:
                _start_ranks(run, label, ranks, output_dir)
            return _one_result(_gather(ranks, run))
        except KeyboardInterrupt as stop:
            ignore_signals()  # a second Ctrl-C must not cut the partial result off (stopping() keeps this)
            if ranks:
                for rank in ranks:
                    _signal(rank.process.pid, signal.SIGTERM)
                result = _one_result([rank.result or _receive(rank, run, timeout=GRACE_S) for rank in ranks])
            else:
                result = _lost(run, "interrupted before the job started")
            if result.status != Status.KILLED:
                result.status, result.error = Status.KILLED, result.error or "interrupted (Ctrl-C or SIGTERM)"
            raise JobInterrupted(result, getattr(stop, "signum", signal.SIGINT)) from None
        finally:
            for rank in ranks:
                if rank.serves_more and rank.result is not None and rank.result.status != Status.KILLED:
                    continue  # the prediction process waits for the next prediction
                if rank.serves_more:
                    _PREDICTOR.stop()  # it ends as soon as it has nothing left to answer
                rank.process.join(timeout=GRACE_S)
                if rank.process.is_alive():
                    rank.process.kill()
                    rank.process.join()


class JobInterrupted(Stopped):
    """The sweep was stopped during a job; carries that job's result so it can be recorded."""

    def __init__(self, result: JobResult, signum: int):
        super().__init__(signum)
        self.result = result


@dataclass
class _Rank:
    """One process of a job and the pipe its result comes back on."""

    process: BaseProcess
    receiver: Connection
    result: JobResult | None = None
    serves_more: bool = False  # the prediction process: it lives on after this job


def _in_predictor(run: RunConfig) -> bool:
    """Jobs that run in the long-lived prediction process: predictions of one process."""
    return run.cfg.mode == "predict" and run.cfg.world_size == 1


class _Predictor:
    """The sweep's side of the prediction process (sweep/predictor.py), started at the first use and replaced
    when it has ended (a stop, a crash); it ends with the sweep process, or with the fork server."""

    def __init__(self) -> None:
        self.rank: _Rank | None = None
        self.starting: threading.Thread | None = None

    def prefetch(self, runs: list[RunConfig]) -> None:
        """Announce the sweep's predictions, in order: the process predicts them while the sweep records.
        Returns at once: starting the process waits for the fork server's imports, which Hydra's start
        overlaps (a job forked from the sweep process itself is started here and now)."""
        message = (PREFETCH, runs, dict(os.environ))
        if start_method() == "fork":
            self._started().receiver.send(message)
            return
        self.starting = threading.Thread(target=lambda: self._started().receiver.send(message), daemon=True)
        self.starting.start()

    def submit(self, run: RunConfig, output_dir: Path | None) -> _Rank:
        """Ask for one job's prediction (made in `output_dir`, for the files it writes); its result comes back on
        the returned rank's connection."""
        self._announced()
        message = (RUN, run, dict(os.environ), output_dir)
        try:
            rank = self._started()
            rank.receiver.send(message)
        except OSError:  # it ended since it was last asked (a crash): a new one
            self.stop()
            rank = self._started()
            rank.receiver.send(message)
        rank.result = None
        return rank

    def stop(self) -> None:
        """The sweep is stopping: the process is told there is nothing more to predict, and forgotten."""
        self._announced()  # the announcement being sent goes to the process about to be let go
        if self.rank is not None:
            self.rank.receiver.close()
            self.rank = None

    def _announced(self) -> None:
        """Wait until the announcement (`prefetch`) has been sent, if one is on its way."""
        if self.starting is not None:
            self.starting.join()
            self.starting = None

    def _started(self) -> _Rank:
        if self.rank is not None and not self.rank.process.is_alive():  # it ended (a crash, a stop)
            self.rank.receiver.close()
            self.rank.process.join()
            self.rank = None
        if self.rank is None:
            context = mp.get_context(start_method())
            parent_end, child_end = context.Pipe(duplex=True)
            # daemon: multiprocessing ends it at exit instead of waiting for it
            process = context.Process(target=_predictor_main, args=(child_end, parent_end), name="sweepbp-predictions",
                                      daemon=True)
            process.start()
            child_end.close()
            self.rank = _Rank(process, parent_end, serves_more=True)
            atexit.register(_end_at_exit, self.rank)
        return self.rank


class _Predictors:
    """The sweep's prediction processes (`prediction_processes()` of them): the announced predictions are dealt
    out in turn (job 1 to the first, job 2 to the second, ...), and a job's request goes to the process it was
    announced to (an unannounced one to the first)."""

    def __init__(self, size: int) -> None:
        self.members = [_Predictor() for _ in range(size)]
        self.routes: dict[str, int] = {}  # config_key -> the member it was announced to

    def prefetch(self, runs: list[RunConfig]) -> None:
        for index, member in enumerate(self.members):
            share = runs[index::len(self.members)]
            if share:
                self.routes.update((config_key(run), index) for run in share)
                member.prefetch(share)

    def submit(self, run: RunConfig, output_dir: Path | None) -> _Rank:
        return self.members[self.routes.get(config_key(run), 0)].submit(run, output_dir)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


PROCESSES_VARIABLE = "SWEEPBP_PREDICTION_PROCESSES"


def prediction_processes() -> int:
    """How many prediction processes a sweep runs: one per CPU but one (left to the sweep process, which composes,
    records and draws each job), at least 1 and at most 4; or SWEEPBP_PREDICTION_PROCESSES. On 2 CPUs that is 1:
    a second process did not clearly speed up a 12-job map (docs/performance.md)."""
    wanted = os.environ.get(PROCESSES_VARIABLE, "")
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    return max(1, min(4, len(os.sched_getaffinity(0)) - 1))


_PREDICTOR = _Predictors(prediction_processes())
EXIT_WAIT_S = 5.0  # at the sweep's exit, how long the prediction process may take to end by itself


def _end_at_exit(rank: _Rank) -> None:
    """At the sweep process's exit: the prediction process sees the end of its input and leaves by itself.
    Waited for (briefly), because multiprocessing then terminates what is left of its daemons with SIGTERM,
    which would land in the middle of that exit."""
    rank.receiver.close()
    rank.process.join(timeout=EXIT_WAIT_S)


def prefetch_predictions(runs: list[RunConfig]) -> None:
    """The command line knows the sweep's jobs: if they are all predictions, they start now, in the sweep's order.
    Not when measured jobs share the machine (their timed steps would), nor with resume=true (the jobs it skips
    would be predicted for nothing), nor with snapshot=true (the job writes into its folder, not made yet)."""
    if runs and all(_in_predictor(run) and not run.cfg.resume and not run.cfg.snapshot for run in runs):
        _PREDICTOR.prefetch(runs)


def _start_ranks(run: RunConfig, label: str, ranks: list[_Rank], output_dir: Path | None) -> None:
    """Start every rank, appending each to `ranks` as soon as it runs (so a stop can reach it)."""
    context = mp.get_context(start_method())
    world = run.cfg.world_size
    port = free_port() if world > 1 else 0
    for rank in range(world):
        receiver, sender = context.Pipe(duplex=False)
        # The child gets this process's environment as it is now (the fork server's is from its start).
        environ = dict(os.environ)
        if world > 1:
            environ.update(rank_environment(rank, world, port))
        name = f"sweepbp-{label}" + (f"-rank{rank}" if world > 1 else "")
        process = context.Process(target=_child_main, args=(sender, run, label, environ, output_dir), name=name)
        process.start()
        sender.close()
        ranks.append(_Rank(process, receiver))


def _gather(ranks: list[_Rank], run: RunConfig) -> list[JobResult]:
    """Every rank's result. A rank that ends without success stops the others, which would otherwise
    wait for it in their next collective until the process group times out."""
    pending = {rank.receiver: rank for rank in ranks}
    while pending:
        for receiver in wait(list(pending)):
            rank = pending.pop(receiver)
            rank.result = _receive(rank, run)
            if rank.result.status != Status.OK:
                for other in pending.values():
                    _signal(other.process.pid, signal.SIGTERM)
    return [rank.result for rank in ranks if rank.result is not None]


def _one_result(results: list[JobResult]) -> JobResult:
    return results[0] if len(results) == 1 else merge_ranks(results)


def _receive(rank: _Rank, run: RunConfig, timeout: float | None = None) -> JobResult:
    if timeout is not None and not rank.receiver.poll(timeout):
        return _lost(run, "the job did not stop within the grace period")
    try:
        return JobResult.from_json(rank.receiver.recv())
    except EOFError:
        rank.process.join(timeout=5)
        code = rank.process.exitcode
        if code == -signal.SIGKILL and not rank.serves_more:  # a prediction needs no host memory to speak of
            # The kernel's out-of-memory killer sends SIGKILL: the host ran out of memory.
            result = _lost(run, "the job process was killed (SIGKILL), most likely by the host's out-of-memory killer")
            result.status = Status.OOM
            return result
        return _lost(run, f"the job process died with exit code {code}")


def _lost(run: RunConfig, why: str) -> JobResult:
    return JobResult.of(run, Status.FAILED, why)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _predictor_main(connection: Connection, sweep_end: Connection) -> None:
    """The prediction process (sweep/predictor.py): predictions until the sweep closes the connection or a stop."""
    from sweepbp.job import Interrupted, run_job  # the job's modules, in the job's process (see _child_main)

    sweep_end.close()  # a forked copy of the sweep's end would keep the connection open after the sweep closed it
    die_with_parent(os.getppid())
    interrupt = raise_once(Interrupted)
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)
    code = 0
    try:
        PredictionServer(connection, run_job, Interrupted).serve()
    except Interrupted:  # a stop after the last answer (the sweep process ending terminates its daemons)
        pass
    except BaseException:  # a bug in sweepbp itself: the sweep records the job as lost (EOF) and starts anew
        traceback.print_exc()
        code = 1
    finally:
        ignore_signals()  # nothing is left to answer: a stop from here on must not print a traceback
        connection.close()
        os._exit(code)


def _child_main(sender, run: RunConfig, label: str, environ: dict[str, str], output_dir: Path | None) -> None:
    use_environment(environ)
    # The job's own modules, imported here in the job's process: the sweep process never imports torch.
    from sweepbp.job import Interrupted, run_job
    from sweepbp.train.distributed import local_rank, setup_rank

    if "LOCAL_RANK" in environ:
        setup_rank()

    die_with_parent(os.getppid())  # the fork server (or the sweep process), which ends with the sweep
    interrupt = raise_once(Interrupted)
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)
    code = 0
    try:
        # One progress line per job: rank 0's.
        result = run_job(run, progress=ProgressLine(label, run) if local_rank() == 0 else None, output_dir=output_dir)
        sender.send(result.to_json(indent=None))
    except BaseException:  # a bug in sweepbp itself: still hand back a record
        traceback.print_exc()
        code = 1
        try:
            sender.send(_lost(run, traceback.format_exc().strip().splitlines()[-1]).to_json(indent=None))
        except BaseException:
            pass
    finally:
        sender.close()
        os._exit(code)
