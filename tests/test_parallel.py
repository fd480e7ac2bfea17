"""Parallel jobs: Hydra's joblib launcher runs 2 jobs at a time (its preset), each in a loky worker that forks the
job's own process, and every run lands in the one SQLite store: none lost to "database is locked", none twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from sweeps import SMALL, artifact_json, run_sweep, runs_of

SEEDS = [str(seed) for seed in range(4)]


@pytest.mark.slow
def test_two_way_parallel_sweep_of_four_jobs_records_four_runs(tmp_path: Path):
    args = [f"trainer.seed={','.join(SEEDS)}", "batch.size=1", *SMALL, "hydra/launcher=joblib"]
    code, stderr = run_sweep(args, tmp_path, timeout=600)

    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    jobs, parents = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(jobs) == len(SEEDS)
    assert sorted(r.data.params["trainer.seed"] for r in jobs) == SEEDS  # each job once
    assert sorted(int(r.data.tags["sweepbp.job_num"]) for r in jobs) == list(range(len(SEEDS)))
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs)
    assert all((r.data.tags["sweepbp.status"], r.info.status) == ("ok", "FINISHED") for r in jobs)
    assert all(artifact_json(tmp_path, r)["status"] == "ok" for r in jobs)
    # The jobs really ran side by side: some runs were open at the same time.
    spans = sorted((r.info.start_time, r.info.end_time) for r in jobs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
