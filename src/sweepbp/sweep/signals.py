"""How the sweep and its jobs react to Ctrl-C, SIGTERM and to their sweep process dying.

The sweep process turns SIGINT and SIGTERM into `Stopped` (a KeyboardInterrupt that remembers the
signal), so a `kill PID` stops a sweep as cleanly as Ctrl-C. While a finished job's files (results.json,
config.yaml) are written, signals are held back (`held`) and take effect right after, so they are never
left half-written; a call to the tracking store is not held: a stop ends it at once (tracking/guard.py), and
a run it leaves unfinished stays RUNNING, as after `kill -9`. Once a stop has been caught, later signals are
ignored until the sweep has recorded the job and exited.
A job process raises its interrupt exception once and ignores repeats (Lightning restores the handler
it found after its own teardown, and the sweep forwards the signal a second time). A job process also
dies with its sweep process (Linux), so `kill -9` of the sweep leaves no orphan holding the device.
No heavy import here: the command line installs these before anything else.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Stopped(KeyboardInterrupt):
    """The sweep was asked to stop by a signal; `exit_code` is the shell convention 128 + signal."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise `Stopped` in this (the sweep's main) thread."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stopped)


def ignore_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on (the sweep is already stopping)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stopped_exit_code(stop: KeyboardInterrupt, message: str) -> int:
    """After a command line caught a stop: ignore later signals (so a second Ctrl-C cannot turn the one
    line into a traceback), print `message`, and return the shell's exit code (128 + signal)."""
    ignore_signals()
    print(message, file=sys.stderr)
    return stop.exit_code if isinstance(stop, Stopped) else 128 + signal.SIGINT


def _main_thread() -> bool:
    """Python lets only the main thread set signal handlers (a threading joblib backend runs jobs elsewhere)."""
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stopping() -> Iterator[None]:
    """`stop_on_signals` for the duration of a block. On a normal exit the handlers found before it are
    restored; when a stop leaves the block, further SIGINT/SIGTERM are ignored from then on, so nothing cuts
    short the recording of what was stopped (the sweep exits right after it)."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop_on_signals()
    try:
        yield
    except KeyboardInterrupt:
        ignore_signals()
        raise
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back during a block (writing a job's files), then raise `Stopped` if one came. A
    signal ignored before the block (the sweep is already stopping) stays ignored."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, lambda s, f: pending.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pending:
        raise Stopped(pending[0])


def raise_once(make_exception: Callable[[], BaseException]) -> Callable[[int, object], None]:
    """A handler that raises on the first signal and ignores every later one."""
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise make_exception()

    return handler


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; leave at once if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: an orphaned job finishes its work and exits
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
