"""Shared test helpers: compose real configs, run real jobs, run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweepbp.cli import check_job, config_dir
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
    return check_job(overrides)


def run_cli(args: list[str], cwd: Path, timeout: float = 420, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """`python -m sweepbp ARGS` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "CI": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "sweepbp", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A real SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
