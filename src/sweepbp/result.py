"""A job's outcome as one typed value: status, config, metrics, environment. Serialised to results.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path

STATUSES = ("ok", "oom", "failed", "diverged", "killed", "skipped")


@dataclass
class JobResult:
    """Everything one job produced; the sweep report is computed from these records alone."""

    status: str
    mode: str
    config: dict
    choices: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    timeline: list[dict] = field(default_factory=list)  # live bytes by category through the traced step

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text; indent=None is compact (several times faster for a long timeline: the pipe from a job)."""
        # A shallow dict: every field already holds JSON-ready values, and asdict's deep copy of the
        # timeline costs more than the encoding.
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, indent=indent, default=str)

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
