"""Runs that can be told apart at a glance (issue #18): what a sweep and its jobs are called, what a sweep's
parent run holds once it ends, what the MLflow UI is given to open on, and the terminal's last word.

In-process, on a real SQLite MLflow store in tmp_path; the end-to-end checks ride on the real sweeps of
tests/test_report.py (against a real server) and tests/test_interrupts.py (resume=true).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient
from test_report import _record

from sweepbp.config import TrackingConfig
from sweepbp.metrics import known
from sweepbp.report.headline import headline
from sweepbp.report.summary import summarize
from sweepbp.report.tables import NO_BUDGET, answers, csv_text, table
from sweepbp.report.naming import SweepPlan, single_run_name
from sweepbp.tracking import SWEEP_GROUP, open_store
from sweepbp.tracking.mlflow_view import VIEW_TAG

SWEEPS = {"lora.r=8,16 memory=ckpt,none": (["lora.r=8,16", "memory=ckpt,none"], 4),
          "memory=ckpt memory.every=1,2,4": (["memory=ckpt", "memory.every=1,2,4"], 3)}


def test_a_sweep_is_named_after_what_it_swept_and_its_jobs_after_their_values():
    plan = SweepPlan.of(*SWEEPS["lora.r=8,16 memory=ckpt,none"])
    assert plan.name == "lora.r=8,16 x memory=ckpt,none (4 jobs)"
    assert plan.params() == {"lora.r": "8,16", "memory": "ckpt,none"}
    names = [plan.job_name([f"lora.r={r}", f"memory={m}"], n)
             for n, (r, m) in enumerate((r, m) for r in (8, 16) for m in ("ckpt", "none"))]
    assert names == ["r=8 memory=ckpt", "r=8 memory=none", "r=16 memory=ckpt", "r=16 memory=none"]

    walk = SweepPlan.of(*SWEEPS["memory=ckpt memory.every=1,2,4"])
    assert walk.name == "memory.every=1,2,4 (3 jobs); memory=ckpt"  # what is fixed follows what was swept
    assert [walk.job_name(["memory=ckpt", f"memory.every={k}"], n) for n, k in enumerate((1, 2, 4))] == [
        "every=1", "every=2", "every=4"]


def test_job_names_stay_unique_and_hydra_and_credentials_stay_out():
    plan = SweepPlan.of(["trainer.seed=0,0", "hydra/launcher=joblib", "tracking.uri=http://u:s3cret@h:5000"], 2)
    assert plan.name == "trainer.seed=0,0 (2 jobs)"  # where jobs run and are recorded is not what they measure
    assert [plan.job_name(["trainer.seed=0"], n) for n in (0, 1)] == ["seed=0 #0", "seed=0 #1"]  # values repeat
    assert "s3cret" not in plan.command and "tracking.uri=http://***@h:5000" in plan.command
    assert plan.params() == {"trainer.seed": "0,0"}
    assert SweepPlan.from_env() is None  # a sweep not started by `python -m sweepbp`: the old names
    assert single_run_name(["lora=attn", "lora.r=16", "data=text"]) == "lora=attn r=16 data=text"
    assert single_run_name([]) is None


def test_the_parent_run_is_named_described_and_answers_at_the_end(tmp_path: Path):
    tracking = TrackingConfig(name="mlflow", uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="glance")
    store = open_store(tracking)
    assert store.find_sweep("s1") is None  # a sweep that reused every job (resume=true) has no parent
    plan = SweepPlan.of(*SWEEPS["lora.r=8,16 memory=ckpt,none"])
    parent = store.open_sweep("s1", tmp_path / "s1", plan.about())
    assert store.find_sweep("s1") == parent

    records = [_record("0", "ckpt", 8, peak_memory_bytes=6e9, tokens_per_s=80.0),
               _record("1", "none", 8, peak_memory_bytes=10e9, tokens_per_s=100.0),
               _record("2", "ckpt", 16, status="oom"), _record("3", "none", 16, status="oom")]
    summary = summarize(records, budgets_gb=[8])
    figures = headline(summary)
    store.answer_sweep(parent, figures, "\n".join(answers(summary)))
    lines = store.present(parent, summary.keys)

    client = MlflowClient(tracking.uri)
    run = client.get_run(parent)
    assert run.info.run_name == "lora.r=8,16 x memory=ckpt,none (4 jobs)"
    assert run.data.params == {"lora.r": "8,16", "memory": "ckpt,none"}
    assert run.data.tags[SWEEP_GROUP] == "lora.r=8,16 x memory=ckpt,none (4 jobs) · s1"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("`python -m sweepbp -m lora.r=8,16 memory=ckpt,none`") and "Within 8 GB: memory=ckpt" in note
    assert all(known(name) for name, _, _ in figures)  # every figure is a catalogue entry
    assert run.data.metrics == {"jobs_total": 4, "jobs_ok": 2, "jobs_oom": 2, "best_tokens_per_s": 100.0,
                                "lowest_peak_memory_bytes": 6e9, "budget_gb": 8.0, "budget_jobs_fit": 1,
                                "budget_best_tokens_per_s": 80.0, "budget_best_peak_memory_bytes": 6e9}

    experiment = client.get_experiment_by_name("glance")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    assert "peak_memory_bytes" in experiment.tags["mlflow.note.content"]
    view = json.loads(experiment.tags[VIEW_TAG])
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": SWEEP_GROUP}]  # runs under their sweep
    assert {"params.`memory`", "params.`lora.r`", "metrics.`tokens_per_s`"} <= set(view["selectedColumns"])
    assert {c["type"] for c in view["compareRunCharts"]} == {"SCATTER", "PARALLEL", "BAR"}
    assert lines[0] == f"[sweepbp] MLflow: the sweep's run is {parent} (experiment {experiment.experiment_id})"
    assert lines[1].endswith(f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
                             "&viewStateShareKey=sweepbp")

    store.present(None, ["memory", "batch.size"])  # a later sweep adds its params to the view
    view = json.loads(client.get_experiment_by_name("glance").tags[VIEW_TAG])
    assert [c for c in view["selectedColumns"] if c.startswith("params.")] == [
        "params.`memory`", "params.`lora.r`", "params.`batch.size`"]


def test_a_predict_sweep_says_what_to_pass_for_a_budget_and_shows_the_chosen_batch():
    records = [_record("0", "none", 8, predicted_peak_memory_bytes=30e9, auto_batch_size=3.0),
               _record("1", "ckpt", 8, predicted_peak_memory_bytes=20e9, auto_batch_size=12.0)]
    summary = summarize(records)
    said = answers(summary)
    assert said[:3] == ["## Fastest configuration within a memory budget", "", NO_BUDGET]  # not an empty heading
    assert "auto batch" in table(summary).splitlines()[0] and "| 12 |" in table(summary)
    assert csv_text(summary).splitlines()[0].split(",")[3:5] == ["predicted_peak_memory_bytes", "auto_batch_size"]
    assert dict((n, v) for n, v, _ in headline(summary)) == {
        "jobs_total": 2, "jobs_ok": 2, "jobs_oom": 0, "lowest_predicted_peak_memory_bytes": 20e9}


def test_a_single_prediction_prints_its_figures(tmp_path: Path, capsys):
    """A single mode=predict run's terminal answer holds the predicted peak, not only its status."""
    from types import SimpleNamespace

    from conftest import FAST, compose

    from sweepbp.job import run_job
    from sweepbp.sweep.task import _print_outcome

    result = run_job(compose([*FAST, "mode=predict", "tracking=none"]))
    _print_outcome(result, SimpleNamespace(output_dir=tmp_path))
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith("[sweepbp] status=ok ")
    peak = f"predicted_peak_memory_bytes={result.metrics['predicted_peak_memory_bytes']:,.0f}"
    assert peak in line and "predicted_activation_bytes=" in line

    result.environment["prediction_error"] = "RuntimeError: the trace failed"  # a measured job's lost prediction
    _print_outcome(result, SimpleNamespace(output_dir=tmp_path))
    assert "prediction_error=RuntimeError: the trace failed" in capsys.readouterr().err.splitlines()[0]
