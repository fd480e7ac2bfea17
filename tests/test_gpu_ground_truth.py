"""The GPU ground-truth script's CPU path: the same sweep, records, tables and MLflow import with the tiny
model, so the GPU run (docs/gpu-ground-truth.md) does not fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, problems_of

from sweepbp.cli.precheck import available_options

sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_ground_truth import DEFAULT_AXES, DEFAULT_MEMORY, axis_overrides, key  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_ground_truth.py"


def test_cpu_smoke_runs_the_sweep_writes_the_tables_and_imports_into_mlflow(tmp_path):
    # One thread: tiny ops on a busy 2-core machine otherwise spin in OpenMP (seconds per step).
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CI": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gt"
    # Two strategies keep it short; a name without a conf/memory option is skipped, as on the GPU machine.
    axes = "loss=fused"  # one extra sweep keeps it short; the quant ones take the same path
    done = subprocess.run([sys.executable, str(SCRIPT), "run", "--cpu-smoke", "--out", str(out),
                           "--memory", "none,ckpt,no_such_strategy", "--axes", axes], env=env, capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipped: no_such_strategy" in done.stdout
    strategies = ["none", "ckpt"]
    assert set(DEFAULT_MEMORY.split(",")) <= set(available_options("memory"))  # the GPU sweep's default exists
    results = json.loads((out / "results.json").read_text())
    main = [r for r in results if r["config"]["loss"]["name"] == "standard" and r["config"]["quant"]["name"] == "none"]
    modes = sorted((r["mode"], r["config"]["memory"]["name"]) for r in main)
    assert modes == sorted((mode, m) for mode in ("measure", "predict") for m in strategies)
    # one more sweep per axis at memory=ckpt, batch 1: predicted and measured
    assert len(results) - len(main) == 2 * len(axes.split(";"))
    assert all(r["status"] == "ok" for r in results), [r.get("error") for r in results]
    for r in results:
        if r["mode"] == "measure":
            assert r["metrics"]["predicted_error_pct"] == 0.0
    table = (out / "h200.md").read_text()
    assert "| none | 1 |  | ok |" in table and "| ckpt | 1 |  | ok |" in table and "| ckpt | 1 | loss=fused | ok |" in table
    assert "- loss=fused vs the defaults (ckpt, batch 1): step time" in table
    assert "+0.0%" in table and "## The claims" in table and "checkpointing trades speed for memory" in table

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    imported = subprocess.run([sys.executable, str(SCRIPT), "import", str(out / "results.json"),
                               "--tracking-uri", store, "--experiment", "h200"], env=env, capture_output=True,
                              text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("h200")
    jobs = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(jobs) == len(results)
    predicted = [r for r in jobs if r.data.tags["sweepbp.mode"] == "predict"]
    assert predicted and all(r.data.tags["sweepbp.env.predicted_device"] == "cpu" for r in predicted)
    assert all(r.data.metrics["predicted_peak_memory_bytes"] > 0 for r in jobs)
    assert sorted(r.data.params["memory.name"] for r in jobs) == sorted(r["config"]["memory"]["name"] for r in results)


def test_every_default_axis_is_a_valid_gpu_job_and_labelled_in_the_tables():
    """The H200 run's extra sweeps: each passes the pre-flight checks as the GPU machine would run it (CUDA
    target, 8B; here the measured job's only problem is this machine's missing GPU), and its jobs get their
    own label in the tables."""
    for axis in DEFAULT_AXES.split(";"):
        overrides = [o for o in axis_overrides(axis, smoke=False) if not o.startswith("mode=")]
        assert problems_of(["mode=predict", *overrides]) == [], axis
        measured = problems_of(["mode=measure", *overrides])
        assert [p for p in measured if "without a CUDA GPU" not in p] == [], axis
    full = {"memory": {"name": "ckpt"}, "batch": {"size": 1}, "loss": {"name": "standard"},
            "quant": {"name": "none"}, "method": {"name": "full"}, "optim": {"name": "adamw8bit"}}
    assert key({"config": full}) == ("ckpt", 1, "method=full optim=adamw8bit")
