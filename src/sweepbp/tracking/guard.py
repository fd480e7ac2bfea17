"""A tracking store that goes away must not stop a sweep from measuring.

MLflow's HTTP client retries a lost server for minutes; sweepbp bounds every call to seconds
(`mlflow_store.HTTP_BOUNDS`), and `Guarded` makes the first call that fails the last one this process
makes to that store: it raises `StoreDown` (with `first` set once, so the sweep says so in one line) and
every later call raises it at once, so the remaining jobs run and write their results.json without
waiting on the store. A Ctrl-C or SIGTERM that cuts a call short takes the store down the same way (what
the call had sent is unknown; the sweep is ending anyway). A job folder whose run is not (completely) in
the store gets `not_in_store.txt`, which says why and how to add it: `python -m sweepbp.report --sync
SWEEP_DIR` (report/sync.py) records those runs and removes the files. No heavy import here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sweepbp.result import one_line
from sweepbp.tracking import Store, StoreError
from sweepbp.tracking.redaction import redact_text

NOT_IN_STORE = "not_in_store.txt"
STORE_METHODS = frozenset(name for name in vars(Store) if not name.startswith("_"))
STOPPED = "a stop (Ctrl-C or SIGTERM) ended the sweep before this run was recorded"


class StoreDown(RuntimeError):
    """The store failed in this process; nothing more is sent to it. `first` is set on the first failure only."""

    def __init__(self, reason: str, first: bool):
        super().__init__(reason)
        self.reason, self.first = reason, first


class Guarded:
    """A `Store` (opened on first use) whose first failure is its last in this process; `StoreError` (a
    plain "no such run" answer) is not a failure."""

    def __init__(self, open_store: Callable[[], Store]):
        self._open = open_store
        self._store: Store | None = None
        self.down: str | None = None  # why nothing more is sent to the store

    def __getattr__(self, name: str) -> Callable:
        if name not in STORE_METHODS:
            raise AttributeError(name)

        def call(*args, **kwargs):
            if self.down is not None:
                raise StoreDown(self.down, first=False)
            try:
                if self._store is None:
                    self._store = self._open()
                return getattr(self._store, name)(*args, **kwargs)
            except StoreError:
                raise
            except KeyboardInterrupt:
                self.down = STOPPED
                raise
            except Exception as err:  # noqa: BLE001 (any failure of the store: the sweep goes on without it)
                self.down = redact_text(one_line(root_cause(err)))
                raise StoreDown(self.down, first=True) from None

        return call


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception behind `err` (MLflow wraps `ConnectionRefusedError` in three layers of text)."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def mark_not_in_store(job_dir: Path, store: str, reason: str, sync_command: str) -> None:
    """Leave `not_in_store.txt` in a job folder whose run the store lacks (or holds cut short)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / NOT_IN_STORE).write_text(
        f"This job's run is not (completely) in the tracking store {store}: {reason}.\n"
        f"Its results.json is complete. Add it to the store with:\n    {sync_command}\n")


def not_in_store(folder: Path) -> list[Path]:
    """The job folders of a sweep folder (or the one job folder given) whose runs the store lacks."""
    return sorted(p.parent for p in [*folder.glob(NOT_IN_STORE), *folder.glob(f"*/{NOT_IN_STORE}")])


def missing_runs_line(folder: Path) -> str | None:
    """The line a sweep (or a single run) ends with when the store misses some of its runs."""
    missing = not_in_store(folder)
    if not missing:
        return None
    return (f"[sweepbp] {len(missing)} run(s) not in the tracking store (job folders with {NOT_IN_STORE}); "
            f"add them with: {sync_command(folder)}")


def sync_command(folder: Path) -> str:
    """The command that adds a sweep's (or a job's) missing runs, with the folder as the user would type it."""
    try:
        shown = folder.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = folder.resolve()
    return f"python -m sweepbp.report --sync {shown}"
