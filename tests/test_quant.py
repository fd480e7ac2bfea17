"""Quantised base weights (quant=nf4, int8): real bitsandbytes jobs on CPU, exact predictions, the
accounting of packed weights and their state, peft's fp32 trap, and the pre-flight errors."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import FAST, compose, problems_of

from sweepbp.job import run_job
from sweepbp.predict.trace import predict

pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")

BF16 = "model.dtype=bfloat16"
TINY_LINEARS = 4 * 7  # 4 layers x q, k, v, o, gate, up, down; the head stays unquantised


@pytest.fixture(scope="module")
def tiny_jobs() -> dict[str, dict[str, float]]:
    out = {}
    for label, overrides in {"none": [], "nf4": ["quant=nf4"], "nf4_raw": ["quant=nf4", "quant.prepare=false"],
                             "int8": ["quant=int8"]}.items():
        result = run_job(compose([*FAST, "tracking=none", BF16, *overrides]))
        assert result.status == "ok", result.error
        out[label] = result.metrics
    return out


def test_packed_weights_count_in_param_bytes_and_their_state_apart(tiny_jobs):
    none, nf4, raw, int8 = (tiny_jobs[k] for k in ("none", "nf4", "nf4_raw", "int8"))
    assert none["quantized_layers"] == 0 and none["quant_state_bytes"] == 0
    for metrics in (nf4, raw, int8):
        assert metrics["quantized_layers"] == TINY_LINEARS
        assert metrics["quant_state_bytes"] > 0
    linear_weights = 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 344)  # q, o; k, v (2 kv heads); MLP
    # nf4 without peft's fp32 cast: the quantised linears shrink from 2 bytes to half a byte per weight
    assert none["param_bytes"] - raw["param_bytes"] == linear_weights * 2 - linear_weights // 2
    # int8: one byte per weight, and a per-row scale apart (fp32 per output feature)
    assert int8["quant_state_bytes"] == 4 * 4 * (128 + 64 + 64 + 128 + 344 + 344 + 128)
    # peft's prepare_model_for_kbit_training casts every unquantised bf16 weight to fp32: embeddings and
    # head (512 x 128 each), 9 norms of 128; 2 more bytes each
    assert nf4["param_bytes"] - raw["param_bytes"] == 2 * (2 * 512 * 128 + 9 * 128)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_trains_the_adapter(quant):
    """30 steps on the learnable synthetic sequence (test_skeleton's setting): the loss falls through the
    adapter alone, with the base weights quantised."""
    result = run_job(compose(["tracking=none", f"quant={quant}", BF16, "model.config.vocab_size=64", "trainer.steps=30",
                              "trainer.warmup_steps=1", "trainer.lr=1e-2", "batch.size=4", "batch.seq_len=32"]))
    assert result.status == "ok", result.error
    assert result.losses[-1] < 0.8 * result.losses[0]
    assert result.metrics["grad_bytes"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["quant=nf4", "quant.quant_type=int4"], "quant.quant_type must be nf4 or fp4, got 'int4'"),
    (["quant=nf4", "quant.compute_dtype=float8"], "quant.compute_dtype must be one of float32, bfloat16, float16"),
    (["quant=int8", "quant.threshold=-1"], "quant.threshold must be zero or positive, got -1.0"),
    (["quant=nf4", "strategy=fsdp", "trainer.devices=2", "mode=predict"], "strategy must be single or ddp with quant=nf4"),
    (["quant=nf4", "trainer.precision=bf16-mixed", "mode=predict"], "trainer.precision must be a -true or 32 precision "
                                                                   "to predict quant=nf4, got 'bf16-mixed'"),
])
def test_quant_preflight_errors_are_one_line(overrides, message):
    problems = problems_of(["tracking=none", *overrides])
    assert len(problems) == 1 and problems[0].startswith(message), problems


@pytest.mark.parametrize("memory", ["selective", "offload", "ckpt_offload"])
def test_qlora_composes_with_the_other_memory_strategies_and_the_fused_loss(memory):
    result = run_job(compose([*FAST, "tracking=none", BF16, "quant=nf4", f"memory={memory}", "loss=fused"]))
    assert result.status == "ok", result.error
    assert "prediction_error" not in result.environment
    for name in ("peak_memory_bytes", "param_bytes", "quant_state_bytes", "activation_bytes", "host_offload_bytes"):
        assert result.metrics[f"predicted_{name}"] == result.metrics[name], name


def test_mixed_precision_qlora_is_measured_and_its_prediction_declined():
    result = run_job(compose([*FAST, "tracking=none", BF16, "quant=nf4", "trainer.precision=bf16-mixed"]))
    assert result.status == "ok", result.error
    assert result.metrics["tokens_per_s"] > 0 and "predicted_peak_memory_bytes" not in result.metrics
    assert "is not predicted" in result.environment["prediction_error"]


def test_without_bitsandbytes_quant_is_a_preflight_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert problems_of(["tracking=none", "quant=nf4"]) == [
        "quant must be none without bitsandbytes installed, got 'nf4' (install the extra: pip install -e \".[quant]\")"]
    assert problems_of(["tracking=none"]) == []


def test_llama3_8b_qlora_predicts_packed_weights_and_the_fp32_trap():
    """The issue's acceptance figures, for a CUDA target from this CPU (batch 1 x 2048, checkpointing)."""
    common = ["model=llama3_8b", "memory=ckpt", "batch.size=1", "batch.seq_len=2048", "mode=predict",
              "trainer.accelerator=gpu", "tracking=none"]
    weights = {}
    for label, overrides in {"none": [], "nf4": ["quant=nf4", "quant.prepare=false"],
                             "nf4_prepared": ["quant=nf4"]}.items():
        prediction = predict(compose([*common, *overrides]).cfg, "cuda")
        weights[label] = prediction.metrics()["predicted_param_bytes"]
        if label != "none":
            assert prediction.quantized_layers == 32 * 7
    assert 0.3 < weights["nf4"] / weights["none"] < 0.4  # embeddings and head stay bf16
    # the embeddings and head (2 x 128,256 x 4,096) and the norms, from 2 to 4 bytes
    assert weights["nf4_prepared"] - weights["nf4"] == pytest.approx(2 * 128256 * 4096 * 2, rel=0.01)
