"""The sweep's answer: summary, Pareto chart, report rebuilt from the store, runs served by a real MLflow
server, and a recorded run rerun with an identical loss curve.

One real sweep (module fixture) runs against a real `mlflow server` on 127.0.0.1: two ok jobs
(memory=none,ckpt x trainer.seed=0) and two that fail in their second training step (trainer.seed=1, a fault
tests/faulty_sweepbp.py injects: what pre-flight can refuse, it does), so the summary is tested with failures
among ok jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import FAST, http_get
from sweeps import FAULTY, cli_env

from sweepbp.report.files import folder_records, write_report
from sweepbp.result import JobResult, Status
from sweepbp.report.summary import Record, fastest_within, summarize, swept_keys
from sweepbp.report.tables import answers, csv_text, table

PNG = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "report-test"


# -- the summary on hand-made records (no jobs run) ------------------------------------------------------
def _record(job: str, memory: str, r: int, status: str = "ok", **metrics: float) -> Record:
    config = {"memory.name": memory, "lora.r": str(r), "batch.size": "2", "budget_gb": "None"}
    if memory == "ckpt":
        config["memory.every"] = "1"
    return Record(job, status, config, {"memory": memory, "model": "tiny"}, metrics)


def test_frontier_budget_and_strategy_costs():
    records = [
        _record("0", "none", 8, peak_memory_bytes=10e9, tokens_per_s=100.0, activation_bytes=6e9),
        _record("1", "ckpt", 8, peak_memory_bytes=6e9, tokens_per_s=80.0, activation_bytes=1.5e9),
        _record("2", "none", 16, peak_memory_bytes=12e9, tokens_per_s=90.0, activation_bytes=6e9),
        _record("3", "ckpt", 16, status="oom"),
    ]
    # memory.every exists only under ckpt: implied by the option, not a swept key of its own
    assert swept_keys(records) == ["memory", "lora.r"]
    records[0].config["resume"], records[1].config["resume"] = "False", "True"  # a resumed sweep: no axis of it
    assert swept_keys(records) == ["memory", "lora.r"]
    summary = summarize(records, budgets_gb=[8, 5])
    assert [r.job for r in summary.frontier] == ["1", "0"]  # job 2 is beaten by job 0 on both axes
    assert fastest_within(records, 8e9, "peak_memory_bytes", "tokens_per_s").job == "1"
    assert fastest_within(records, 5e9, "peak_memory_bytes", "tokens_per_s") is None
    (effect,) = summary.effects  # ckpt r=16 ran out of memory: only r=8 has a pair
    assert (effect.record.job, effect.baseline.job) == ("1", "0")
    assert effect.slowdown == pytest.approx(1.25)
    assert effect.memory_saving == pytest.approx(0.4)
    assert effect.focus_saving == pytest.approx(0.75)  # activations: what the memory strategy acts on
    rows = csv_text(summary).splitlines()
    assert rows[0].startswith("job,memory,lora.r,status,tokens_per_s,peak_memory_bytes,activation_bytes,pareto")
    assert rows[2].startswith("1,ckpt,8,ok,80,6000000000,1500000000,1")
    assert rows[4].startswith("3,ckpt,16,oom,,,,0")


def test_a_noisy_job_is_marked_in_the_table_and_the_answers():
    records = [_record("0", "none", 8, peak_memory_bytes=10e9, tokens_per_s=100.0, timing_noisy=0.0),
               _record("1", "ckpt", 8, peak_memory_bytes=6e9, tokens_per_s=80.0, timing_noisy=1.0)]
    summary = summarize(records)
    rows = table(summary).splitlines()
    assert "| ok |" in rows[2] and "noisy" not in rows[2]
    assert "| ok (noisy timing) |" in rows[3]
    assert "- Job(s) 1: the timed steps spread by more than 25% of their median (`timing_noisy`)" in "\n".join(
        answers(summary))
    assert csv_text(summary).splitlines()[0].split(",").count("timing_noisy") == 1


def test_predicted_metrics_alone_make_a_report(tmp_path):
    """mode=predict runs carry predicted_* metrics only: the x axis falls back to them."""
    records = [_record("0", "none", 8, predicted_peak_memory_bytes=30e9),
               _record("1", "ckpt", 8, predicted_peak_memory_bytes=20e9)]
    summary = summarize(records, budgets_gb=[24])
    assert summary.x == "predicted_peak_memory_bytes"
    files = write_report(summary, tmp_path)
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert "predicted_peak_memory_bytes" in header and "peak_memory_bytes" not in header
    assert (tmp_path / "tradeoff.png").read_bytes().startswith(PNG)
    md = (tmp_path / "summary.md").read_text()  # no throughput to rank by: what fits the budget, what does not
    assert "Within 24 GB (predicted peak memory): fits: memory=ckpt (20.00 GB); does not fit: memory=none (30.00 GB)" in md
    assert [f.name for f in files] == ["summary.csv", "summary.md", "tradeoff.png"]


def test_results_json_holds_every_field_with_one_line_per_timeline_sample(tmp_path):
    """results.json is json.dumps(indent=2) of the record but for the timeline, whose samples are a line each."""
    sample = {"phase": "forward", "by_category": {"param": 64, "activation": 8}, "host": 0}
    result = JobResult(status=Status.OK, mode="predict", config={"lora": {"r": 8}}, choices={"memory": "ckpt"},
                       metrics={"predicted_peak_memory_bytes": 72.0}, timeline=[sample, {**sample, "phase": "backward"}],
                       artifacts=["memory_snapshot.html"])
    text = result.write(tmp_path).read_text()
    assert JobResult.from_json(text) == result
    assert f"    {json.dumps(sample)}," in text.splitlines()
    untimed = JobResult(status=Status.FAILED, mode="measure", config={"lora": {"r": 8}}, choices={}, error="fault")
    data = {f: getattr(untimed, f) for f in ("status", "mode", "config", "choices", "metrics", "losses", "environment",
                                             "error", "timeline", "artifacts")}
    assert untimed.to_json() == json.dumps({**data, "status": "failed"}, indent=2)


# -- a real sweep against a real MLflow server (conftest.server) -----------------------------------------
def _api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory):
    """A 4-job sweep recorded on the server: memory=none,ckpt x trainer.seed=0 (ok), 1 (fails)."""
    cwd = tmp_path_factory.mktemp("sweep")
    corpus = cwd / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    done = subprocess.run([sys.executable, str(FAULTY), "-m", "memory=none,ckpt", "trainer.seed=0,1", "data=text",
                           f"data.path={corpus}", f"tracking.uri={server}", f"tracking.experiment={EXPERIMENT}", *FAST],
                          cwd=cwd, env=cli_env({"OMP_NUM_THREADS": "1", "SWEEPBP_FAULT_FAIL_SEED": "1"}),
                          capture_output=True, text=True, timeout=420)
    sweep_dir = next((cwd / "multirun").glob("*/*"))
    return done, sweep_dir


@pytest.mark.slow
def test_sweep_with_failed_jobs_writes_summary_and_chart(sweep):
    done, sweep_dir = sweep
    assert done.returncode == 1, done.stderr[-3000:]  # failed jobs make the sweep exit non-zero, after all ran
    rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("job,memory,trainer.seed,status,")
    statuses = [row.split(",")[:4] for row in rows[1:]]
    assert statuses == [["0", "none", "0", "ok"], ["1", "none", "1", "failed"],
                        ["2", "ckpt", "0", "ok"], ["3", "ckpt", "1", "failed"]]
    assert "injected fault" in rows[2]  # the error travels into the summary
    md = (sweep_dir / "summary.md").read_text()
    assert "memory=ckpt seed=0 (job 2) vs job 0" in md and "## Not on the chart" in md
    assert (sweep_dir / "tradeoff.png").read_bytes().startswith(PNG)
    assert "| 3 | ckpt | 1 | **failed** |" in done.stdout  # the table printed at the end of the sweep
    for job in ("0", "2"):
        assert (sweep_dir / job / "memory_timeline.png").read_bytes().startswith(PNG)
    records = {r.job: r for r in folder_records(sweep_dir)}
    ckpt, none = records["2"].metrics, records["0"].metrics
    assert ckpt["activation_bytes"] < none["activation_bytes"]  # the chart's story holds on these numbers


@pytest.mark.slow
def test_report_rebuilds_identical_summary_from_the_store_alone(sweep, server, tmp_path, capsys):
    from sweepbp.report.command import main

    _, sweep_dir = sweep
    out = tmp_path / "rebuilt"
    assert main(["--experiment", EXPERIMENT, "--tracking-uri", server, "--out", str(out), "--budget-gb", "0.01"]) == 0
    assert (out / "summary.csv").read_text() == (sweep_dir / "summary.csv").read_text()
    assert (out / "tradeoff.png").read_bytes().startswith(PNG)
    assert "Within 0.01 GB: memory=" in (out / "summary.md").read_text()
    assert "| 1 | none | 1 | **failed** |" in capsys.readouterr().out


@pytest.mark.slow
def test_server_serves_runs_params_metrics_and_chart(sweep, server):
    experiment = _api(server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + EXPERIMENT)
    runs = _api(server, "/api/2.0/mlflow/runs/search",
                {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    (parent,) = [run for run, t in zip(runs, tags) if t.get("sweepbp.role") == "sweep"]
    children = [(run, t) for run, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert sorted(t["sweepbp.status"] for _, t in children) == ["failed", "failed", "ok", "ok"]
    assert parent["info"]["status"] == "FAILED"  # the sweep ended, with failures
    for run, t in children:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["memory"] in ("none", "ckpt") and params["trainer.seed"] in ("0", "1")
        if t["sweepbp.status"] == "ok":
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert metrics["peak_memory_bytes"] > 0 and metrics["tokens_per_s"] > 0
            assert "memory_timeline.png" in _artifact_names(server, run["info"]["run_id"])
    parent_id = parent["info"]["run_id"]
    assert {"summary.csv", "summary.md", "tradeoff.png"} <= _artifact_names(server, parent_id)
    query = urllib.parse.urlencode({"path": "tradeoff.png", "run_uuid": parent_id})
    assert http_get(f"{server}/get-artifact?{query}").startswith(PNG)


@pytest.mark.slow
def test_the_sweep_and_its_jobs_are_named_and_the_end_says_where_to_look(sweep, server):
    """Issue #18 on a real sweep: the parent run says what was swept and holds the answer, each job is named after
    its swept values, and the sweep's last lines name the parent run and the URL of its view."""
    done, _ = sweep
    experiment_id = _api(server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + EXPERIMENT)[
        "experiment"]["experiment_id"]
    runs = _api(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    parent = next(r for r in runs if {"key": "sweepbp.role", "value": "sweep"} in r["data"]["tags"])
    jobs = [r for r in runs if {"key": "mlflow.parentRunId", "value": parent["info"]["run_id"]} in r["data"]["tags"]]
    assert parent["info"]["run_name"].startswith("memory=none,ckpt x trainer.seed=0,1 (4 jobs); data=text")
    assert {p["key"]: p["value"] for p in parent["data"]["params"]}["trainer.seed"] == "0,1"
    assert sorted(r["info"]["run_name"] for r in jobs) == [
        "memory=ckpt seed=0", "memory=ckpt seed=1", "memory=none seed=0", "memory=none seed=1"]
    datasets = [i["dataset"]["name"] for r in jobs for i in r.get("inputs", {}).get("dataset_inputs", [])]
    assert datasets == ["corpus.txt"] * 4  # data=text: the corpus is each job's logged dataset
    answer = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    speeds = [m["value"] for r in jobs for m in r["data"].get("metrics", []) if m["key"] == "tokens_per_s"]
    assert (answer["jobs_total"], answer["jobs_ok"], answer["jobs_oom"]) == (4, 2, 0)
    assert answer["best_tokens_per_s"] == max(speeds) and len(speeds) == 2
    parent_line, url_line = done.stdout.strip().splitlines()[-2:]
    assert parent_line == f"[sweepbp] MLflow: the sweep's run is {parent['info']['run_id']} (experiment {experiment_id})"
    assert url_line == (f"[sweepbp] browse it: {server}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                        "&viewStateShareKey=sweepbp")


def _artifact_names(server: str, run_id: str) -> set[str]:
    listing = _api(server, "/api/2.0/mlflow/artifacts/list?run_id=" + run_id)
    return {Path(f["path"]).name for f in listing.get("files", [])}


@pytest.mark.slow
def test_rerun_reproduces_the_loss_curve_from_the_store(sweep, server, tmp_path):
    from sweepbp.rerun import main

    _, sweep_dir = sweep
    original = json.loads((sweep_dir / "2" / "results.json").read_text())  # memory=ckpt, ok
    run_id = original["environment"]["mlflow_run_id"]
    assert main([run_id, "--tracking-uri", server, "--out", str(tmp_path / "rerun")]) == 0
    again = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert again["losses"] == original["losses"] and len(again["losses"]) == 4
    assert again["config"] == original["config"] | {"tracking": again["config"]["tracking"]}
    new = _api(server, "/api/2.0/mlflow/runs/get?run_id=" + again["environment"]["mlflow_run_id"])["run"]
    assert {t["key"]: t["value"] for t in new["data"]["tags"]}["sweepbp.rerun_of"] == run_id


def test_store_uri_is_printed_as_given():
    """The report names its store: redacting credentials must not mangle an absolute SQLite path."""
    from sweepbp.config import redact_uri

    assert redact_uri("sqlite:////tmp/sweep/mlflow.db") == "sqlite:////tmp/sweep/mlflow.db"
    assert redact_uri("http://user:secret@host:5000") == "http://***@host:5000"


@pytest.mark.slow
def test_sweep_end_summary_has_jobs_that_ran_where_the_folder_is_not_shared(sweep, server, tmp_path):
    """Issue #7: jobs on other machines wrote their results.json elsewhere; the summary at the sweep's end
    takes them from the tracking server, so it equals the summary of the whole folder."""
    import shutil

    from sweepbp.config import TrackingConfig
    from sweepbp.report.files import report_sweep_folder
    from sweepbp.result import sweep_id_of

    _, sweep_dir = sweep
    here = tmp_path / "node-a"
    for job in ("0", "1"):  # only these two jobs ran on this machine
        shutil.copytree(sweep_dir / job, here / job)
    tracking = TrackingConfig(name="mlflow", uri=server, experiment=EXPERIMENT)
    records = report_sweep_folder(here, sweep_id_of(sweep_dir.resolve()), tracking)
    assert (here / "summary.csv").read_text() == (sweep_dir / "summary.csv").read_text()
    # what the sweep's exit code counts besides the folder: job 3 failed on the other machine
    elsewhere = sorted((r.job, r.status) for r in records if r.job not in ("0", "1"))
    assert elsewhere == [("2", "ok"), ("3", "failed")]


def test_an_unreachable_store_at_the_sweeps_end_keeps_the_folders_report(capsys):
    """Adding jobs run elsewhere must not cost the folder's report, nor minutes of HTTP retries."""
    from sweepbp.config import TrackingConfig
    from sweepbp.report.files import _store_only_records

    down = TrackingConfig(name="mlflow", uri="http://127.0.0.1:9", experiment=EXPERIMENT)
    assert _store_only_records(down, "any-sweep", []) == []
    err = capsys.readouterr().err
    assert "jobs run elsewhere not added to the report" in err
    # the health check answered (one refused connection), not MLflow's client after its minutes of retries
    assert "Connection refused" in err and "Mlflow" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--x", "activation_byte"], "--x must be a metric of the catalogue (docs/metrics.md), got 'activation_byte'; "
                                 "did you mean 'activation_bytes'?"),
    (["--y", "tokens_per_sec"], "--y must be a metric of the catalogue"),
    (["--budget-gb", "24", "--budget-gb", "-1"], "--budget-gb must be a positive number of GB, got -1"),
])
def test_a_misspelt_axis_or_a_negative_budget_is_refused(args, message, capsys):
    """Instead of an empty chart that lists every job as 'not on the chart' (a misspelt metric), or an answer for
    a budget no job can meet."""
    from sweepbp.report.command import parse_args

    with pytest.raises(SystemExit) as stopped:
        parse_args(args)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert parse_args(["--x", "predicted_peak_memory_bytes"]).x == "predicted_peak_memory_bytes"


def test_a_sweep_that_measures_and_predicts_compares_predictions_by_their_predicted_figures():
    """mode=measure,predict x memory=none,ckpt: the predictions' pair compares predicted peaks (it said 'no
    metrics to compare'), and the ok predictions off the chart (whose axes are measured) say why."""
    from sweepbp.report.tables import answers, markdown

    def job(number: str, mode: str, memory: str, peak: float, **measured: float) -> Record:
        config = {"memory.name": memory, "mode": mode, "budget_gb": "None"}
        metrics = {"predicted_peak_memory_bytes": peak, "predicted_activation_bytes": peak / 2, **measured}
        return Record(number, "ok", config, {"memory": memory, "model": "tiny"}, metrics)

    records = [job("0", "predict", "none", 10e9), job("1", "predict", "ckpt", 6e9),
               job("2", "measure", "none", 10e9, peak_memory_bytes=10e9, tokens_per_s=100.0, activation_bytes=5e9),
               job("3", "measure", "ckpt", 6e9, peak_memory_bytes=6e9, tokens_per_s=80.0, activation_bytes=1e9)]
    summary = summarize(records)
    by_job = {e.record.job: e for e in summary.effects}
    assert by_job["1"].names[1] == "predicted_peak_memory_bytes" and by_job["1"].memory_saving == pytest.approx(0.4)
    assert by_job["3"].names[1] == "peak_memory_bytes" and by_job["3"].slowdown == pytest.approx(1.25)
    text = "\n".join(answers(summary)) + markdown(summary)
    assert "no metrics to compare" not in text
    assert ("- job 0 (memory=none mode=predict): ok (its record has no peak_memory_bytes and no tokens_per_s; it is "
            "a prediction, with predicted_ figures only)") in text


def test_a_rerun_without_a_store_here_creates_none(tmp_path, monkeypatch, capsys):
    """Run from a folder without mlflow.db, a rerun says where it looked instead of creating an empty store."""
    from sweepbp.rerun import main

    monkeypatch.chdir(tmp_path)
    assert main(["0123456789abcdef"]) == 1
    assert "sweepbp.rerun: error: no MLflow store at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
