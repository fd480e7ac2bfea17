"""A job's outcome as one typed value (status, config, metrics, environment; serialised to results.json),
the statuses it can have, and the ids a sweep is known by."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

from sweepbp.config import RunConfig, config_as_dict


class Status(str, Enum):
    """How a job ended. `oom` and `diverged` are answers about the config, not errors of the tool."""

    OK = "ok"
    OOM = "oom"  # out of memory: the device, the budget_gb cap, or the host's OOM killer
    DIVERGED = "diverged"  # the loss became NaN or infinite
    FAILED = "failed"  # any other error
    KILLED = "killed"  # stopped by Ctrl-C or SIGTERM
    RUNNING = "running"  # not finished (yet): recorded while it runs, or cut short by kill -9

    def __str__(self) -> str:
        return self.value

    @property
    def is_error(self) -> bool:
        """A sweep with a job of this status exits non-zero."""
        return self in (Status.FAILED, Status.KILLED)

    @property
    def reusable(self) -> bool:
        """resume=true does not run a config again that ended like this."""
        return self in (Status.OK, Status.OOM)

    @property
    def severity(self) -> int:
        """When the ranks of one job disagree, the most severe status (the lowest number) explains the job: a
        rank that ran out of memory beats the ranks that were stopped because of it."""
        return SEVERITY.index(self)


SEVERITY = (Status.OOM, Status.DIVERGED, Status.FAILED, Status.KILLED, Status.RUNNING, Status.OK)


@dataclass
class JobResult:
    """Everything one job produced; the sweep report is computed from these records alone."""

    status: Status
    mode: str
    config: dict
    choices: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    timeline: list[dict] = field(default_factory=list)  # live bytes by category through the traced step
    artifacts: list[str] = field(default_factory=list)  # files the job wrote into its folder, logged with its run

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # from JSON, a plain string

    @classmethod
    def of(cls, run: RunConfig, status: Status, error: str | None = None, **fields_) -> "JobResult":
        """A result for `run`, before or without its measurements (a failed, lost or stopped job)."""
        return cls(status=status, mode=run.cfg.mode, config=config_as_dict(run.cfg), choices=run.choices,
                   error=error, **fields_)

    @property
    def config_hash(self) -> str:
        """Identity of a job's measurement (tag sweepbp.config_hash, what resume=true and the sync command match):
        its resolved config without the keys that cannot change it (a snapshot only draws the measured step:
        resume=true reuses a run made without one)."""
        data = {k: v for k, v in self.config.items() if k not in ("resume", "tracking", "snapshot")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def run_name(self) -> str:
        """A description of the job's config: model, memory strategy (and loss, unless standard), rank, batch. The
        title of its memory timeline, and its run's name where no command line names it (report/naming.py)."""
        loss = self.config.get("loss", {}).get("name", "standard")
        shown_loss = f" {loss}" if loss != "standard" else ""
        return (f"{self.choices.get('model', 'model')} {self.config['memory']['name']}{shown_loss} "
                f"r={self.config['lora']['r']} b={self.config['batch']['size']}")

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text; indent=None is compact (the pipe from a job). Indented, each timeline sample is one line:
        the file reads as a table of samples instead of a dozen lines per sample, and json's C encoder writes
        them (its indenting encoder is Python: 10 ms instead of 21 ms for an 8B prediction's 1,347 samples)."""
        # A shallow dict: every field already holds JSON-ready values, and asdict's deep copy of the
        # timeline costs more than the encoding.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["status"] = self.status.value
        if indent is None:
            return json.dumps(data, default=str)
        pad = " " * indent
        members = []
        for name, value in data.items():
            if name == "timeline" and value:
                text = "[\n" + ",\n".join(pad * 2 + json.dumps(sample, default=str) for sample in value) + f"\n{pad}]"
            else:  # as json.dumps(data, indent=indent) writes it: its lines shifted one level in
                text = json.dumps(value, indent=indent, default=str).replace("\n", "\n" + pad)
            members.append(f"{pad}{json.dumps(name)}: {text}")
        return "{\n" + ",\n".join(members) + "\n}"

    @classmethod
    def from_json(cls, text: str) -> "JobResult":
        return cls(**json.loads(text))

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)  # atomic: a kill never leaves half a file
        return path


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def git_commit(start: Path | None = None) -> str:
    folder = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def host_environment() -> dict[str, str]:
    """What can be said about the machine without importing torch."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "hostname": platform.node(),
        "job_pid": str(os.getpid()),  # the job's process (predictions of a sweep share one, see sweep/worker.py)
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "git_commit": git_commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sweep_id_of(sweep_dir: Path) -> str:
    """A readable sweep id from the sweep folder (multirun/DATE/TIME -> DATE_TIME-<hash>)."""
    digest = hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:6]
    return f"{sweep_dir.parent.name}_{sweep_dir.name}-{digest}"
