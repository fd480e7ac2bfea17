"""Shared test helpers: compose real configs, run real jobs, run the real CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from sweepbp.cli.paths import config_dir
from sweepbp.cli.precheck import check_job
from sweepbp.config import RunConfig, register_schemas, to_run_config

# Small enough for seconds per job on a 2-core CPU, large enough that activations dominate memory.
FAST = ["trainer.steps=4", "trainer.warmup_steps=1", "batch.size=2", "batch.seq_len=32"]
REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]) -> RunConfig:
    """Compose and validate one job's config exactly as `python -m sweepbp` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="test"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return to_run_config(cfg, choices)


def problems_of(overrides: list[str]) -> list[str]:
    register_schemas()
    return check_job(overrides)[0]


def run_cli(args: list[str], cwd: Path, timeout: float = 420, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """`python -m sweepbp ARGS` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "CI": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "sweepbp", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """A generated dataset, its trained tokenizer and the files the data options read (tests/datafiles.py)."""
    from datafiles import make_data_files

    return make_data_files(tmp_path_factory.mktemp("data"))


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A real SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _health(url: str) -> bool:
    return http_get(url + "/health").strip() == b"OK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` with a SQLite backend and served artifacts in `folder` (the same
    folder again: the same backend), once it answers /health; in its own process group."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if _health(url):
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server `start_server` started: it and its uvicorn worker, and wait until they are gone."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Server:
    """The session's `mlflow server`, which a test may kill and start again on the same port with the same
    backend (tests/test_outage.py)."""

    folder: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = start_server(self.folder, self.port)

    def kill(self) -> None:
        """SIGKILL, as a crash or the host's out-of-memory killer ends it; returns once its port refuses."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            assert time.monotonic() < deadline, f"port {self.port} still answers"
            time.sleep(0.05)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and served artifacts, both in a temporary folder."""
    server = Server(tmp_path_factory.mktemp("server"), free_port())
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            stop_server(server.proc)


@pytest.fixture(scope="session")
def server(mlflow_server: Server) -> str:
    """The session server's URL."""
    return mlflow_server.url
