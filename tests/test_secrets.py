"""Secrets: credentials in a tracking URI are redacted wherever sweepbp prints, logs or writes the URI, and
environment variables never reach params, tags or results. (The real sweep in test_failures.py also runs
with secret environment variables and finds none of them in any file it wrote.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import compose
from hydra.types import RunMode
from omegaconf import OmegaConf

from sweepbp.config import TrackingConfig, config_as_dict, config_yaml, leaf_params, redact_uri
from sweepbp.result import JobResult, Status, host_environment
from sweepbp.sweep.callbacks import SweepEnd
from sweepbp.sweep.task import JobContext, _finish
from sweepbp.tracking.redaction import install_log_redaction, redact_text

SECRET_URI = "http://alice:s3cret@mlflow.example:5000/?token=t0k3n&experiment=7"
LEAKS = ("s3cret", "t0k3n")


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@host:5000", "http://***@host:5000"),
    ("https://host/path?token=t0k3n&x=1", "https://host/path?token=***&x=1"),
    ("postgresql://bob:pw@db.example/mlflow", "postgresql://***@db.example/mlflow"),
    ("databricks://profile?access_key=abc", "databricks://profile?access_key=***"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_redact_hides_credentials_and_keeps_the_rest(uri, shown):
    assert redact_uri(uri) == shown


def test_uris_inside_text_are_redacted():
    text = f"#0 : ['lora.r=8', 'tracking.uri={SECRET_URI}'] and again: tracking.uri={SECRET_URI}\n"
    cleaned = redact_text(text)
    assert not any(leak in cleaned for leak in LEAKS)
    assert cleaned.count("http://***@mlflow.example:5000/") == 2 and "lora.r=8" in cleaned


def test_log_records_are_redacted(caplog):
    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="hydra"):
        logging.getLogger("hydra").info("\t#%d : %s", 0, f"tracking.uri={SECRET_URI}")  # Hydra's launcher line
    assert caplog.records and "***@mlflow.example" in caplog.text
    assert not any(leak in caplog.text for leak in LEAKS)


def test_config_params_and_files_never_hold_the_credentials():
    run = compose([f"tracking.uri='{SECRET_URI}'"])
    assert run.cfg.tracking.uri == SECRET_URI  # the job still uses the real URI
    written = json.dumps(config_as_dict(run.cfg)) + config_yaml(run.cfg) + json.dumps(leaf_params(run.cfg))
    assert "***@mlflow.example" in written
    assert not any(leak in written for leak in LEAKS)


def test_a_recorded_job_holds_no_credentials_anywhere(tmp_path: Path, monkeypatch):
    """Params, tags, artifacts and job files of a job whose error message quotes the secret URI."""
    from mlflow.tracking import MlflowClient

    from sweepbp.tracking import open_store

    monkeypatch.setenv("HF_TOKEN", "hf_t0k3n")
    run = compose([f"tracking.uri='{SECRET_URI}'"])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recorder = open_store(TrackingConfig(uri=store))  # the secret server does not exist: record locally
    run_id = recorder.open_job(JobResult.of(run, Status.RUNNING), "secret", None, {"sweepbp.config_hash": "x"})
    result = JobResult(status="failed", mode="measure", config=config_as_dict(run.cfg), choices=run.choices,
                       environment={**host_environment(), "traceback": f"ConnectionError: {SECRET_URI}"},
                       error=f"MlflowException: cannot reach {SECRET_URI}")
    _finish(run, JobContext(tmp_path / "job", None, None, 0, 1), recorder, run_id, result)

    logged = MlflowClient(tracking_uri=store).get_run(run_id)
    assert logged.data.params["tracking.uri"] == "http://***@mlflow.example:5000/?token=***&experiment=7"
    assert logged.data.tags["sweepbp.error"] == "MlflowException: cannot reach " + logged.data.params["tracking.uri"]
    shown = json.dumps([logged.data.params, logged.data.tags])
    assert not any(leak in shown for leak in LEAKS)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]  # job folder, artifacts and the SQLite store itself
    assert {"results.json", "config.yaml", "mlflow.db"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not any(leak.encode() in data for leak in LEAKS), path


def test_hydra_snapshots_of_the_command_line_are_scrubbed(tmp_path: Path):
    job, snapshot = tmp_path / "sweep" / "0", tmp_path / "sweep" / "0" / ".hydra"
    snapshot.mkdir(parents=True)
    escaped = SECRET_URI.replace(":", "\\:").replace("=", "\\=")  # how Hydra writes a swept value
    for name in ("overrides.yaml", "config.yaml", "hydra.yaml"):
        (snapshot / name).write_text(f"- tracking.uri={SECRET_URI}\n- tracking.uri={escaped}\n"
                                     f"override_dirname: lora.r=8,tracking.uri={escaped},trainer.seed=0\n")
    (tmp_path / "sweep" / "multirun.yaml").write_text(f"uri: {SECRET_URI}\n")
    config = OmegaConf.create({"hydra": {"output_subdir": ".hydra", "runtime": {"output_dir": str(job)},
                                         "mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path / "sweep")}}})

    SweepEnd().on_job_start(config=config)

    for path in [*snapshot.iterdir(), tmp_path / "sweep" / "multirun.yaml"]:
        text = path.read_text()
        assert "***@mlflow.example" in text and not any(leak in text for leak in LEAKS), path


def test_hydras_escaped_form_of_a_uri_is_redacted_and_stays_escaped():
    line = "#0 : lora.r=8 tracking.uri=http\\://alice\\:s3cret@host\\:5000 trainer.seed=0"  # Hydra's launcher line
    assert redact_text(line) == "#0 : lora.r=8 tracking.uri=http\\://***@host\\:5000 trainer.seed=0"


def test_credentials_in_the_uri_travel_in_mlflows_variables(monkeypatch):
    """What the sweep hands to Hydra holds no credentials; MLflow's client sends the same basic auth."""
    from mlflow.utils.credentials import get_default_host_creds

    from sweepbp.cli.main import credentials_to_environment

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "before")  # so that the test's end restores the environment as it was
        monkeypatch.delenv(name)
    args = credentials_to_environment(["-m", "lora.r=8,16", "tracking.uri=http://alice:s3cr%40t@host:5000/x"])
    assert args == ["-m", "lora.r=8,16", "tracking.uri='http://host:5000/x'"]
    creds = get_default_host_creds("http://host:5000/x")
    assert (creds.username, creds.password) == ("alice", "s3cr@t")
    swept = ["-m", "tracking.uri=http://a:b@h1,http://a:c@h2"]  # a swept URI is left to the redaction
    assert credentials_to_environment(swept) == swept


def test_the_environment_record_holds_no_secret_variable(monkeypatch):
    for name in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"):
        monkeypatch.setenv(name, "t0k3n")
    assert "t0k3n" not in json.dumps(host_environment())


@pytest.mark.parametrize("uri", ["'http://alice:s3cret@host:5000'", "http://a:s3cret@h1,http://a:s3cret@h2"],
                         ids=["quoted", "swept"])
def test_the_sweeps_command_line_on_its_parent_run_hides_credentials(uri):
    """The parent run's name, params and command come from the command line as typed (report/naming.py)."""
    from sweepbp.report.naming import SweepPlan

    plan = SweepPlan.of([f"tracking.uri={uri}", "lora.r=8,16"], 4)
    assert "s3cret" not in plan.command + plan.to_env() + plan.name + json.dumps(plan.params())
    assert "***@" in plan.command
