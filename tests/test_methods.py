"""What trains and how it is optimised: method (lora, dora, full), lora.adapter_dtype, optim, and gradient
accumulation; each measured on CPU, exactly predicted, and refused in pre-flight where it cannot run."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import FAST, compose, problems_of, run_cli

from sweepbp.cli.precheck import notes
from sweepbp.job import run_job

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def assert_exact(metrics: dict[str, float]) -> None:
    for name in ("peak_memory_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_state_bytes",
                 "activation_bytes", "logits_bytes", "inference_peak_bytes"):
        assert metrics[f"predicted_{name}"] == metrics[name], name


@pytest.fixture(scope="module")
def full_jobs() -> dict[str, dict[str, float]]:
    """method=full with each optimizer that runs on CPU (adamw8bit with its 32-bit floor lowered to 0 is not
    needed here: every full weight of the tiny model but the norms is above 4096 elements)."""
    out = {}
    for optim in ("adamw", "adamw8bit", "adafactor", "sgd"):
        if optim == "adamw8bit" and not HAS_BNB:
            continue
        result = run_job(compose([*FAST, "tracking=none", "method=full", f"optim={optim}"]))
        assert result.status == "ok", result.error
        out[optim] = result.metrics
    return out


def test_full_fine_tuning_trains_every_weight(full_jobs):
    metrics = full_jobs["adamw"]
    assert metrics["frozen_params"] == 0 and metrics["trainable_params"] > 0
    assert metrics["trainable_param_bytes"] == 4 * metrics["trainable_params"]  # fp32 weights, all trained
    assert metrics["grad_bytes"] == metrics["trainable_param_bytes"]
    # AdamW: two fp32 moments per weight, plus one step counter per tensor
    assert 2 * metrics["trainable_param_bytes"] <= metrics["optimizer_state_bytes"] < 2.01 * metrics["trainable_param_bytes"]
    # the seed's "training needs 2-4x the memory of inference" is about full fine-tuning
    assert 2 <= metrics["train_inference_memory_ratio"] <= 4


def test_optimizers_state_as_each_keeps_it_and_predicted_exactly(full_jobs):
    adamw = full_jobs["adamw"]["optimizer_state_bytes"]
    if HAS_BNB:
        assert full_jobs["adamw8bit"]["optimizer_state_bytes"] < 0.3 * adamw
    assert full_jobs["sgd"]["optimizer_state_bytes"] == full_jobs["sgd"]["trainable_param_bytes"]  # momentum
    assert full_jobs["adafactor"]["optimizer_state_bytes"] < 0.05 * adamw  # factored second moment only
    for optim, metrics in full_jobs.items():
        assert_exact(metrics)


# (every method and optimizer with ckpt and accumulation: tests/test_predict.py)
@pytest.mark.parametrize("overrides", [
    ["method=full", "loss=fused"], ["lora.adapter_dtype=model", "model.dtype=bfloat16"],
    ["optim=sgd", "optim.momentum=0"],
], ids=["full-fused", "adapter-bf16", "sgd-no-momentum"])
def test_prediction_is_exact_for_methods_optimizers_and_accumulation(overrides):
    result = run_job(compose([*FAST, "tracking=none", *overrides]))
    assert result.status == "ok", result.error
    assert "prediction_error" not in result.environment
    assert_exact(result.metrics)


def test_adapter_dtype_model_keeps_the_adapters_in_bf16():
    fp32, bf16 = (run_job(compose([*FAST, "tracking=none", "model.dtype=bfloat16", f"lora.adapter_dtype={d}"]))
                  for d in ("float32", "model"))
    assert fp32.metrics["trainable_param_bytes"] == 2 * bf16.metrics["trainable_param_bytes"]
    assert bf16.metrics["activation_bytes"] < fp32.metrics["activation_bytes"]  # no fp32 copy of each input


def test_accumulation_counts_every_token_and_adds_only_the_gradients():
    one = run_job(compose([*FAST, "tracking=none", "batch.accumulate=1"])).metrics
    four = run_job(compose([*FAST, "tracking=none", "batch.accumulate=4"])).metrics
    assert four["tokens_per_s"] == pytest.approx(4 * 2 * 32 / four["step_time_s"])
    assert four["samples_per_s"] == pytest.approx(4 * 2 / four["step_time_s"])
    extra_tokens = 3 * 2 * (2 * 32 * 8)  # the 3 other micro-batches' input_ids and labels (int64)
    assert one["peak_memory_bytes"] < four["peak_memory_bytes"]
    assert four["peak_memory_bytes"] - one["peak_memory_bytes"] <= one["grad_bytes"] + extra_tokens + 8


def test_auto_batch_with_an_effective_size_finds_the_micro_batch_and_its_accumulation():
    from sweepbp.predict.trace import predict

    probe = compose([*FAST, "tracking=none", "mode=predict", "batch.size=2", "batch.accumulate=4"]).cfg
    fits_2x4 = predict(probe, "cpu").peak_bytes
    budget_gb = fits_2x4 * 1.0001 / 1e9  # 2 x 4 fits, 4 x 2 does not (a larger micro-batch holds more)
    result = run_job(compose([*FAST, "tracking=none", "batch.size=auto", "batch.effective_size=8",
                              f"budget_gb={budget_gb}"]))
    assert result.status == "ok", result.error
    assert (result.metrics["auto_batch_size"], result.metrics["auto_accumulate"]) == (2, 4)
    assert result.metrics["peak_memory_bytes"] <= budget_gb * 1e9


@pytest.mark.parametrize("overrides, message", [
    (["method=full", "quant=nf4"], "method must be lora or dora with quant=nf4, got 'full'"),
    (["optim=paged_adamw8bit", "mode=predict"], "optim must be adamw, adamw8bit, adafactor or sgd to predict"),
    (["optim=paged_adamw8bit"], "optim must be adamw, adamw8bit, adafactor or sgd on a machine without a CUDA GPU"),
    (["optim=sgd", "optim.momentum=1.5"], "optim.momentum must be in [0, 1), got 1.5"),
    (["lora.adapter_dtype=fp8"], "lora.adapter_dtype must be float32 or model, got 'fp8'"),
    (["batch.accumulate=0"], "batch.accumulate must be a positive integer (1 = no accumulation), got 0"),
    (["batch.effective_size=8"], "batch.effective_size must be null unless batch.size=auto"),
])
def test_method_and_optim_preflight_errors_are_one_line(overrides, message):
    if "quant=nf4" in overrides and not HAS_BNB:
        pytest.skip("the .[quant] extra")
    problems = problems_of(["tracking=none", *overrides])
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_lora_overrides_with_full_fine_tuning_are_a_note_not_an_error(tmp_path):
    assert notes(["method=full", "lora.r=16"]) == ["lora.r=16 has no effect with method=full (every weight trains; "
                                                   "there is no adapter)"]
    assert notes(["method=lora", "lora.r=16"]) == []
    # the command line says it before composing (--cfg job: no job, no heavy import); the job itself runs as any
    # method=full job (test_full_fine_tuning_trains_every_weight)
    done = run_cli(["method=full", "lora.r=16", "--cfg", "job"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sweepbp: note: lora.r=16 has no effect with method=full" in done.stderr
    assert "name: full" in done.stdout
