"""The loss axis: chunked and fused cross-entropy equal transformers' loss, allocate less, and say why not.

Tolerance for "equal": the options compute the same fp32 cross-entropy of the same logits element by
element and the same gradient of every logit; what differs is the order in which the per-token losses are
summed (per slice, then the slices), so the loss may differ in its last bits (rtol 1e-6: a sum of n fp32
terms reordered moves by at most about n * 2^-24 relative, far less in practice) and the adapter gradients
agree to rtol 1e-5 (on this CPU they are bit-identical; on a GPU the smaller per-chunk matmuls of `fused`
may pick kernels that accumulate in another order). The same tolerance holds for bf16 weights, since each
logit's fp32 gradient is cast to bf16 the same way.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import FAST, compose, problems_of
from steps import KeepGradients, build

from sweepbp.cli.precheck import available_options
from sweepbp.job import run_job
from sweepbp.predict.trace import predict
from sweepbp.train.loss import chunked_cross_entropy, shifted_labels
from sweepbp.train.step import train_step

LOSS_RTOL = 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-8
EXACT = ("chunked", "fused")  # the options that claim the standard loss's value and gradients


def _untimed(phase: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def loss_and_gradients(overrides: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step of the module's own `train_step`: the loss and every adapter gradient."""
    cfg = compose([*FAST, "tracking=none", *overrides]).cfg
    model, applied, batches = build(overrides)
    optimizer = KeepGradients(model)
    loss = train_step(model, applied, cfg.loss, batches[0], optimizer, torch.Tensor.backward, _untimed)
    return loss.item(), optimizer.grads


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("memory", ["none", "ckpt"])
@pytest.mark.parametrize("loss", EXACT)
def test_same_loss_and_adapter_gradients_as_standard(loss, memory, dtype):
    common = [f"memory={memory}", f"model.dtype={dtype}"]
    reference_loss, reference = loss_and_gradients([*common, "loss=standard"])
    value, grads = loss_and_gradients([*common, f"loss={loss}", "loss.chunks=3"])  # uneven slices too
    assert value == pytest.approx(reference_loss, rel=LOSS_RTOL)
    assert grads.keys() == reference.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], rtol=GRAD_RTOL, atol=GRAD_ATOL), name
        assert grad.abs().sum() > 0, name  # the gradient reached every adapter through the loss


def test_chunked_cross_entropy_is_transformers_loss_with_ignored_labels():
    """The labels' shift and the ignored positions (-100) follow ForCausalLMLoss, for any slicing."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 7), generator=generator)
    labels[0, 2:4] = -100
    expected = ForCausalLMLoss(logits, labels, vocab_size=11)
    for chunks in (1, 2, 7):
        assert chunked_cross_entropy(logits, labels, chunks) == pytest.approx(expected.item(), rel=LOSS_RTOL)
    assert shifted_labels(labels)[0, -1] == -100 and shifted_labels(labels)[1, 0] == labels[1, 1]


@pytest.fixture(scope="module")
def tiny_sweep() -> dict[str, dict[str, float]]:
    """One measured job per loss option on a model whose vocabulary makes the logits the largest transient."""
    out = {}
    for loss in EXACT + ("standard",):
        result = run_job(compose([*FAST, "tracking=none", f"loss={loss}", "model.config.vocab_size=8192",
                                  "trainer.precision=bf16-true"]))
        assert result.status == "ok", result.error
        out[loss] = result.metrics
    return out


def test_each_option_shrinks_the_loss_transient_as_documented(tiny_sweep):
    standard, chunked, fused = (tiny_sweep[name]["logits_bytes"] for name in ("standard", "chunked", "fused"))
    tokens, vocab = 2 * 32, 8192
    # standard: the fp32 log-softmax kept for the backward, its incoming and outgoing fp32 gradients
    assert standard >= 12 * tokens * vocab
    assert fused < standard / 5  # 8 slices: no full logits tensor ever exists
    assert fused < chunked < standard  # chunked still holds the bf16 logits whole
    for name, metrics in tiny_sweep.items():
        assert metrics["predicted_logits_bytes"] == metrics["logits_bytes"], name
    assert tiny_sweep["fused"]["peak_memory_bytes"] < tiny_sweep["standard"]["peak_memory_bytes"]


def test_loss_phase_is_its_own_band_of_the_timeline():
    result = run_job(compose([*FAST, "tracking=none", "loss=fused"]))
    phases = [sample["phase"] for sample in result.timeline]
    first, last = phases.index("loss"), len(phases) - 1 - phases[::-1].index("loss")
    assert set(phases[first:last + 1]) == {"loss"}  # one band: the loss's forward, then its backward
    assert "forward" in phases[:first] and "backward" in phases[last + 1:]
    in_band = [s["by_category"]["logits"] for s in result.timeline[first:last + 1]]
    assert max(in_band) == result.metrics["logits_bytes"] > 0
    # the (thinned) timeline still holds the step's peak, so the chart draws it
    assert len(result.timeline) > 0
    assert max(sum(s["by_category"].values()) for s in result.timeline) == result.metrics["peak_memory_bytes"]


@pytest.mark.parametrize("overrides, message", [
    (["loss=fused", "loss.chunks=0"], "loss.chunks must be between 1 and batch.seq_len=128, got 0"),
    (["loss=chunked", "loss.chunks=129"], "loss.chunks must be between 1 and batch.seq_len=128, got 129"),
    (["loss=fused", "+model.config.logit_scale=0.5"], "loss must be standard or chunked for a model whose head "
                                                      "rescales its logits (model.config.logit_scale), got 'fused'"),
    (["loss=liger", "mode=predict"], "loss must be standard, chunked or fused with mode=predict, got 'liger'"),
    (["loss=liger", "trainer.accelerator=cpu"], "loss must be standard, chunked or fused on trainer.accelerator=cpu"),
])
def test_loss_preflight_errors_are_one_line(overrides, message):
    problems = problems_of(["tracking=none", *overrides])
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_liger_without_its_package_or_a_gpu_is_a_preflight_error():
    import importlib.util

    problems = problems_of(["tracking=none", "loss=liger"])
    assert len(problems) == 1
    if importlib.util.find_spec("liger_kernel") is None:
        assert 'pip install -e ".[liger]"' in problems[0]
    elif not torch.cuda.is_available():
        assert "CUDA" in problems[0]


def test_every_shipped_loss_option_is_covered():
    assert set(available_options("loss")) == {"standard", *EXACT, "liger"}


def test_llama3_8b_fused_loss_at_8192_tokens_predicts_the_documented_saving():
    """The issue's acceptance figure, for a CUDA target from this CPU: batch 1 x 8192, checkpointing."""
    figures = {}
    for loss in ("standard", "fused"):
        cfg = compose(["model=llama3_8b", "memory=ckpt", f"loss={loss}", "batch.size=1", "batch.seq_len=8192",
                       "mode=predict", "trainer.accelerator=gpu", "tracking=none"]).cfg
        figures[loss] = predict(cfg, "cuda").metrics()
    standard, fused = figures["standard"], figures["fused"]
    assert fused["predicted_logits_bytes"] < standard["predicted_logits_bytes"] / 5
    assert standard["predicted_peak_memory_bytes"] - fused["predicted_peak_memory_bytes"] >= 8e9
    # standard: 12 bytes per vocabulary entry per token, the figure the issue quotes
    assert standard["predicted_logits_bytes"] == pytest.approx(12 * 8192 * 128256, rel=0.01)
