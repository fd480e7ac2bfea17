"""The walking skeleton end to end: LoRA training, a real multirun subprocess read back from MLflow,
local checkpoints, user option files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, compose, run_cli

from sweepbp.job import run_job
from sweepbp.train.environment import pick_device


def test_only_lora_weights_train_and_the_loss_falls():
    import lightning as L
    from torch.utils.data import DataLoader

    from sweepbp.memory import apply_memory_strategy
    from sweepbp.train.data import TokenBatches
    from sweepbp.train.lora import apply_lora
    from sweepbp.train.model import build_model
    from sweepbp.train.module import LoraFinetune

    # A small vocabulary makes the counting sequence learnable in 30 steps through the adapter alone.
    run = compose(["model.config.vocab_size=64", "trainer.steps=30", "trainer.warmup_steps=1", "trainer.lr=1e-2", "batch.size=4",
                   "batch.seq_len=32"])
    cfg = run.cfg
    device = pick_device("cpu")
    model = apply_lora(build_model(cfg.model, device, cfg.trainer.seed), cfg.lora)
    applied = apply_memory_strategy(model, cfg.memory, device)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    module = LoraFinetune(model, applied, cfg.loss, cfg.optim, cfg.trainer.lr, 0.0, cfg.trainer.warmup_steps, None)
    batches = TokenBatches(cfg.data, cfg.trainer.steps, 4, 32, model.config.vocab_size, 0)
    L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, DataLoader(batches, batch_size=None))

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed, "nothing trained"
    assert all("lora_" in name for name in changed), sorted(changed - {n for n in changed if "lora_" in n})
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)
    first, last = sum(module.losses[:3]) / 3, sum(module.losses[-3:]) / 3
    assert last < first - 0.5, module.losses


def test_local_safetensors_checkpoint_round_trip(tmp_path):
    from sweepbp.train.model import build_model

    run = compose(FAST)
    saved = build_model(run.cfg.model, torch.device("cpu"), seed=7)
    saved.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    assert list((tmp_path / "ckpt").glob("*.safetensors"))

    loaded_run = compose([*FAST, f"model.pretrained_path={tmp_path / 'ckpt'}", "tracking=none"])
    loaded = build_model(loaded_run.cfg.model, torch.device("cpu"), seed=0)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    result = run_job(loaded_run)
    assert result.status == "ok", result.error
    # the measured run's prediction (on meta: shapes from the checkpoint's config.json) is exact too
    assert "prediction_error" not in result.environment
    assert result.metrics["predicted_peak_memory_bytes"] == result.metrics["peak_memory_bytes"]
    predicted = run_job(compose([*FAST, f"model.pretrained_path={tmp_path / 'ckpt'}", "tracking=none",
                                 "mode=predict"]))
    assert predicted.status == "ok", predicted.error
    assert predicted.metrics["predicted_peak_memory_bytes"] == result.metrics["peak_memory_bytes"]


@pytest.mark.slow
def test_multirun_sweep_records_four_grouped_runs_in_mlflow(tmp_path, store):
    from mlflow.tracking import MlflowClient

    done = run_cli(["-m", "lora.r=8,16", "memory=ckpt,none", *FAST, f"tracking.uri={store}"], cwd=tmp_path,
                   check=True)
    assert "sweep finished: 4 jobs (4 ok)" in done.stderr

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("sweepbp")
    runs = client.search_runs([experiment.experiment_id])
    jobs = [r for r in runs if r.data.tags.get("sweepbp.role") != "sweep"]
    parents = [r for r in runs if r.data.tags.get("sweepbp.role") == "sweep"]
    assert len(jobs) == 4 and len(parents) == 1
    assert {(r.data.params["lora.r"], r.data.params["memory"]) for r in jobs} == {
        ("8", "ckpt"), ("8", "none"), ("16", "ckpt"), ("16", "none")}
    for r in jobs:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["sweepbp.status"] == "ok"
        assert r.data.tags["sweepbp.sweep_id"] == parents[0].data.tags["sweepbp.sweep_id"]
        assert r.info.status == "FINISHED"
        for metric in ("tokens_per_s", "samples_per_s", "step_time_s", "peak_memory_bytes", "loss"):
            assert r.data.metrics[metric] > 0, metric
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 4
        for key in ("sweepbp.env.torch", "sweepbp.env.transformers", "sweepbp.env.peft", "sweepbp.env.lightning",
                    "sweepbp.env.device_name", "sweepbp.env.git_commit"):
            assert r.data.tags[key], key
        assert r.data.params["model"] == "tiny" and r.data.params["model.config.hidden_size"] == "128"
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "results.json"} <= artifacts
    results = sorted(tmp_path.glob("multirun/*/*/*/results.json"))
    assert len(results) == 4
    assert all(json.loads(p.read_text())["status"] == "ok" for p in results)


@pytest.mark.slow
def test_single_run_from_any_folder_with_a_user_option_file(tmp_path):
    user_model = tmp_path / "conf" / "model"
    user_model.mkdir(parents=True)
    (user_model / "mini.yaml").write_text(
        "defaults:\n  - model_schema\n  - _self_\n"
        "config:\n  vocab_size: 256\n  hidden_size: 64\n  intermediate_size: 128\n  num_hidden_layers: 2\n"
        "  num_attention_heads: 2\n  num_key_value_heads: 2\n  max_position_embeddings: 256\n")
    done = run_cli(["model=mini", *FAST, "tracking=none"], cwd=tmp_path, check=True)
    assert "status=ok" in done.stderr
    (result_path,) = tmp_path.glob("outputs/*/*/results.json")
    result = json.loads(result_path.read_text())
    assert result["choices"]["model"] == "mini"
    assert result["config"]["model"]["config"]["hidden_size"] == 64
    assert not (tmp_path / "mlflow.db").exists()
