"""Beyond one process: launcher presets, a sweep through the real submitit launcher, a two-rank DDP job on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, compose, problems_of, run_cli

TINY = [*FAST, "lora.target_modules=[q_proj,v_proj]"]


def _with_hydra(overrides: list[str]):
    """The composed config including Hydra's own node (launcher, sweeper)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sweepbp.cli.paths import config_dir
    from sweepbp.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def _client(store: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store)


def _runs(store: str, experiment: str = "sweepbp") -> list:
    client = _client(store)
    experiment = client.get_experiment_by_name(experiment)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.parametrize(("preset", "target", "batch", "fields"), [
    ("basic", "hydra._internal.core_plugins.basic_launcher.BasicLauncher", None, {}),
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", None, {"n_jobs": 2}),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", 1,
     {"gpus_per_node": 1, "timeout_min": 120}),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", None,
     {"gpus_per_node": 1, "timeout_min": 120, "array_parallelism": 16, "partition": None}),
])
def test_launcher_presets_are_the_plugins_configs_with_sweepbps_defaults(preset, target, batch, fields):
    cfg = _with_hydra([f"hydra/launcher={preset}"])
    assert cfg.hydra.launcher._target_ == target
    assert cfg.hydra.sweeper.max_batch_size == batch  # submitit_local: one job at a time
    assert {key: cfg.hydra.launcher[key] for key in fields} == fields


def test_launcher_presets_keep_the_plugins_schema():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="partiton"):
        _with_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"])
    cfg = _with_hydra(["hydra/launcher=submitit_local", "hydra.sweeper.max_batch_size=4"])
    assert cfg.hydra.sweeper.max_batch_size == 4  # the user's choice wins


def test_other_hydra_applications_keep_the_plugins_defaults(tmp_path):
    """The presets are stored only when the application is sweepbp: another app sees the plugin's own config."""
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text("x: 1\n")
    script = ("from hydra import compose, initialize_config_dir\n"
              f"with initialize_config_dir(config_dir={str(tmp_path)!r}, version_base='1.3'):\n"
              "    cfg = compose('config', overrides=['hydra/launcher=submitit_slurm'], return_hydra_config=True)\n"
              "print(cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.array_parallelism)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "256"]


def test_slurm_preset_asks_for_one_gpu_a_time_limit_and_an_array_limit(tmp_path, monkeypatch):
    """The sbatch script that hydra/launcher=submitit_slurm submits for a 20-job sweep: the real plugin's
    launch() and submitit write it; fake `srun` and `sbatch` on PATH stand in for a cluster, and sbatch keeps
    the script and refuses the job."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from omegaconf import OmegaConf

    fake = tmp_path / "bin"
    fake.mkdir()
    kept = tmp_path / "submitted.sh"
    (fake / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {kept}\necho 'no cluster here' >&2\nexit 1\n")
    (fake / "srun").write_text("#!/bin/sh\n")  # submitit looks for srun before it submits anything
    for tool in ("sbatch", "srun"):
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")
    cfg = _with_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher = SlurmLauncher(**{k: v for k, v in params.items() if k != "_target_"})
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    with pytest.raises(Exception, match="no cluster here"):
        launcher.launch([[f"trainer.seed={i}"] for i in range(20)], initial_job_idx=0)
    text = kept.read_text()
    assert "#SBATCH --gpus-per-node=1" in text
    assert "#SBATCH --time=120" in text
    assert "#SBATCH --partition=gpu" in text
    assert "#SBATCH --array=0-19%16" in text


def test_multi_device_needs_a_multi_device_strategy():
    assert problems_of(["trainer.devices=2"]) == [
        "trainer.devices must be 1 with strategy=single, got 2 (use strategy=ddp or fsdp)"]
    assert problems_of(["strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]) == [
        "strategy must be single or ddp on trainer.accelerator=cpu, got 'fsdp' (FSDP needs GPUs)"]
    assert compose(["strategy=ddp", "trainer.devices=2"]).choices["strategy"] == "ddp"


@pytest.mark.slow
def test_sweep_through_the_real_submitit_local_launcher_into_a_real_server_one_job_at_a_time(tmp_path, server):
    """Issue #7's done-when: the same sweep command through hydra/launcher=submitit_local, recorded on a
    running `mlflow server` (conftest.server, on 127.0.0.1)."""
    experiment = "submitit-local"
    done = run_cli(["-m", "lora.r=4,8", "hydra/launcher=submitit_local", *TINY, f"tracking.uri={server}",
                    f"tracking.experiment={experiment}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("multirun/*/*/*/results.json"))
    assert [json.loads(p.read_text())["status"] for p in results] == ["ok", "ok"]
    submitted = [p for p in tmp_path.glob("multirun/*/*/.submitit/*") if p.name.isdigit()]  # submitit job ids
    assert len(submitted) == 2
    launcher = next(tmp_path.glob("multirun/*/*/0/.hydra/hydra.yaml")).read_text()
    assert "timeout_min: 120" in launcher and "gpus_per_node: 1" in launcher  # sweepbp's preset reached the job
    runs = _runs(server, experiment)
    jobs = [r for r in runs if r.data.tags.get("sweepbp.role") != "sweep"]
    parents = [r for r in runs if r.data.tags.get("sweepbp.role") == "sweep"]
    assert len(parents) == 1 and len(jobs) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}
    assert sorted(r.data.params["lora.r"] for r in jobs) == ["4", "8"]
    first, second = jobs
    assert second.info.start_time >= first.info.end_time  # one job at a time


@pytest.mark.slow
def test_ddp_on_cpu_records_one_run_with_every_rank(tmp_path, store):
    done = run_cli(["strategy=ddp", "trainer.devices=2", *TINY, f"tracking.uri={store}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _runs(store)
    assert len(runs) == 1
    metrics, tags = runs[0].data.metrics, runs[0].data.tags
    assert metrics["world_size"] == 2
    assert tags["sweepbp.env.process_group_backend"] == "gloo"
    assert tags["sweepbp.env.process_group_size"] == "2"
    for rank in (0, 1):
        assert metrics[f"peak_memory_bytes_rank{rank}"] > metrics[f"activation_bytes_rank{rank}"] > 0
    assert metrics["peak_memory_bytes"] == max(metrics["peak_memory_bytes_rank0"], metrics["peak_memory_bytes_rank1"])
    assert metrics["tokens_per_s"] == pytest.approx(metrics["tokens_per_s_rank0"] + metrics["tokens_per_s_rank1"])
    result = json.loads(next(Path(tmp_path).glob("outputs/*/*/results.json")).read_text())
    assert result["metrics"]["world_size"] == 2
