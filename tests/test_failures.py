"""Failures are results: out of memory, divergence and job errors are recorded, and the sweep goes on.

The memory budget is not guessed: the two jobs of the sweep are first measured without one, each alone in
a clean process, and the budget is put between their peaks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import compose
from sweeps import SMALL, artifact_json, in_clean_process, run_sweep, runs_of, sweep_dirs

from sweepbp.job import run_job
from sweepbp.report.summary import Record
from sweepbp.sweep.callbacks import summary_lines

# The exact tracker's figures: identical for one config whatever ran before it in the process.
TRACKED = ("peak_memory_bytes", "param_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_state_bytes",
           "activation_bytes", "other_bytes", "inference_peak_bytes")
SECRETS = {"HF_TOKEN": "hf_sweepbpSECRET1", "MLFLOW_TRACKING_PASSWORD": "sweepbpSECRET2",
           "AWS_SECRET_ACCESS_KEY": "sweepbpSECRET3", "SWEEPBP_API_TOKEN": "sweepbpSECRET4"}


def run_alone(overrides: list[str]) -> dict:
    """One job in this (fresh) process; its result without the timeline."""
    result = asdict(run_job(compose(overrides)))
    result.pop("timeline")
    return result


def run_after_oom(oom_overrides: list[str], ok_overrides: list[str]) -> dict:
    """An out-of-memory job, then another job in the same process (no process isolation at all)."""
    import gc

    import torch

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

    before = live_tensors()
    oom = run_job(compose(oom_overrides))
    leaked = live_tensors() - before
    ok = run_job(compose(ok_overrides))
    return {"oom": oom.status, "oom_error": oom.error, "leaked_tensors": leaked, "ok": ok.status,
            "metrics": ok.metrics}


@pytest.fixture(scope="module")
def alone() -> dict[int, dict]:
    """batch.size 1 and 64 measured without a budget, each alone in a clean process."""
    return {size: in_clean_process(run_alone, [f"batch.size={size}", *SMALL]) for size in (1, 64)}


@pytest.fixture(scope="module")
def budget_gb(alone) -> float:
    """A budget between the peaks: batch 1 fits; batch 64's inference pass fits, its training step does not."""
    small, large = alone[1]["metrics"], alone[64]["metrics"]
    floor = max(small["peak_memory_bytes"], large["inference_peak_bytes"])
    assert floor < large["peak_memory_bytes"], "batch 64 must need more memory to train than batch 1 and inference"
    return (floor + large["peak_memory_bytes"]) / 2 / 1e9


@pytest.mark.slow
def test_out_of_memory_is_a_result_and_the_sweep_goes_on(tmp_path: Path, alone, budget_gb):
    code, stderr = run_sweep(["batch.size=1,64", f"budget_gb={budget_gb}", *SMALL], tmp_path, env=SECRETS)

    assert code == 0, stderr
    assert "1 job(s) ran out of memory" in stderr
    jobs, parents = runs_of(tmp_path)
    assert len(jobs) == 2 and len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    by_status = {run.data.tags["sweepbp.status"]: run for run in jobs}
    assert set(by_status) == {"ok", "oom"}
    ok, oom = by_status["ok"], by_status["oom"]
    assert (ok.data.params["batch.size"], oom.data.params["batch.size"]) == ("1", "64")
    assert oom.info.status == "FINISHED"  # an answer, not an error
    assert "budget_gb" in oom.data.tags["sweepbp.error"]
    # What was measured before the budget ran out is kept: setup, model size and the whole inference pass.
    assert oom.data.metrics["setup_time_s"] > 0
    assert oom.data.metrics["inference_peak_bytes"] == alone[64]["metrics"]["inference_peak_bytes"]
    assert oom.data.metrics["trainable_params"] == alone[64]["metrics"]["trainable_params"]
    assert artifact_json(tmp_path, oom)["status"] == "oom"
    for key in TRACKED:  # the budget changes nothing for a job that fits
        assert ok.data.metrics[key] == alone[1]["metrics"][key], key
    sweep = sweep_dirs(tmp_path)[0]
    assert [json.loads((sweep / n / "results.json").read_text())["status"] for n in ("0", "1")] == ["ok", "oom"]
    assert_no_secret_in(tmp_path)


def assert_no_secret_in(folder: Path) -> None:
    """No environment secret in any file of a sweep: store, artifacts, job folders, Hydra's snapshots."""
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in SECRETS.values():
                assert value.encode() not in data, f"{value} leaked into {path}"


def test_a_job_after_an_oom_reports_what_it_reports_alone(alone, budget_gb):
    budget = f"budget_gb={budget_gb}"
    after = in_clean_process(run_after_oom, ["batch.size=64", budget, *SMALL], ["batch.size=1", budget, *SMALL])

    assert after["oom"] == "oom", after["oom_error"]
    assert after["leaked_tensors"] == 0  # the failed job's model, activations and traceback are gone
    assert after["ok"] == "ok"
    for key in TRACKED:
        assert after["metrics"][key] == alone[1]["metrics"][key], key


def test_an_absurd_learning_rate_diverges():
    result = in_clean_process(run_alone, ["trainer.lr=1e30", "batch.size=2", *SMALL])

    assert result["status"] == "diverged"
    assert "loss became" in result["error"]
    assert result["losses"] and result["losses"][0] == result["losses"][0]  # step 1 was finite, then it blew up


@pytest.mark.slow
def test_a_failed_job_fails_the_sweep_after_all_jobs_ran(tmp_path: Path):
    code, stderr = run_sweep(["trainer.seed=1,2", "batch.size=1", *SMALL], tmp_path,
                             env={"SWEEPBP_FAULT_FAIL_SEED": "1"}, faulty=True)

    assert code == 1
    assert "1 job(s) failed or were killed" in stderr
    jobs, parents = runs_of(tmp_path)
    assert [(r.data.params["trainer.seed"], r.data.tags["sweepbp.status"], r.info.status) for r in jobs] == [
        ("1", "failed", "FAILED"), ("2", "ok", "FINISHED")]
    assert jobs[0].data.tags["sweepbp.error"] == "RuntimeError: injected fault"
    assert "injected fault" in artifact_json(tmp_path, jobs[0])["environment"]["traceback"]
    assert parents[0].info.status == "FAILED"


@pytest.mark.parametrize(("statuses", "code"), [
    (["ok", "oom", "diverged"], 0),
    (["ok", "failed", "ok"], 1),
    (["killed", "ok"], 1),
])
def test_only_failed_and_killed_jobs_make_a_sweep_exit_non_zero(statuses, code):
    records = [Record(str(i), s, {}, {"memory": "none"}, {}) for i, s in enumerate(statuses)]
    lines, exit_code = summary_lines(records, Path("multirun/x"))
    assert exit_code == code
    assert lines[0].startswith(f"[sweepbp] sweep finished: {len(statuses)} jobs (")
