"""The exact tracker against hand-computed sizes, and checkpointing's effect measured by it."""

from __future__ import annotations

import torch
from conftest import FAST, compose

from sweepbp.job import run_job
from sweepbp.measure.stats import TimingSummary, is_noisy, varied_throughput
from sweepbp.measure.tracker import ACTIVATION, GRAD, OTHER, PARAM, TRAINABLE, MemoryTracker

F32 = 4


def test_tracker_is_exact_on_a_hand_built_step():
    """y = x @ W.T; loss = sum(y * y). Every byte is computable by hand."""
    batch, d_in, d_out = 8, 64, 32
    weight = torch.nn.Parameter(torch.randn(d_out, d_in))
    frozen = torch.randn(d_out, d_in)  # a frozen weight that takes no part: counted, never freed
    x = torch.randn(batch, d_in)
    tracker = MemoryTracker("cpu")
    tracker.register([weight], TRAINABLE)
    tracker.register([frozen], PARAM)
    tracker.register([x], OTHER)
    start = (2 * d_out * d_in + batch * d_in) * F32
    assert tracker.live_bytes == start

    with tracker:
        with tracker.phase_of("forward"):
            y = x @ weight.t()  # saved by mul's backward, and x by mm's backward (x is already counted)
            loss = (y * y).sum()
        after_forward = tracker.live_bytes
        with tracker.phase_of("backward"):
            loss.backward()
            tracker.retag(weight.grad, GRAD)
    report = tracker.report()

    y_bytes, y2_bytes, scalar = batch * d_out * F32, batch * d_out * F32, F32
    # y*y is freed once sum has consumed it: after the forward, y and the loss scalar stay.
    assert after_forward == start + y_bytes + scalar
    # The forward's peak: y, y*y and the scalar alive together.
    assert report.category_peaks[ACTIVATION] == y_bytes + y2_bytes + scalar
    assert report.category_peaks[GRAD] == d_out * d_in * F32
    assert report.at_peak[PARAM] == d_out * d_in * F32
    assert report.at_peak[TRAINABLE] == d_out * d_in * F32
    assert sum(report.at_peak.values()) == report.peak_bytes


def test_budget_raises_out_of_memory_when_live_bytes_exceed_it():
    tracker = MemoryTracker("cpu", budget_bytes=1000)
    with tracker:
        small = torch.zeros(100)  # 400 bytes: fits
        try:
            torch.zeros(200)  # +800 bytes: over
        except torch.OutOfMemoryError as err:
            assert "budget" in str(err)
        else:
            raise AssertionError("no out-of-memory error")
    assert small.numel() == 100


def _job(layers: int, memory: str):
    run = compose([*FAST, f"model.config.num_hidden_layers={layers}", f"memory={memory}", "tracking=none"])
    result = run_job(run)
    assert result.status == "ok", result.error
    return result.metrics


def test_categories_add_up_and_checkpointing_saves_what_the_layer_count_predicts():
    none4, none8, ckpt8 = _job(4, "none"), _job(8, "none"), _job(8, "ckpt")
    per_layer = (none8["activation_bytes"] - none4["activation_bytes"]) / 4
    outside_layers = none4["activation_bytes"] - 4 * per_layer
    hidden_bytes = 2 * 32 * 128 * F32  # one layer input: batch x seq x hidden, fp32
    # Checkpointing keeps every layer's input; its peak is either the end of the forward (inputs plus what
    # lies outside the layers: embeddings, norm, logits) or one layer recomputed in the backward, when the
    # head's activations are already freed.
    expected_ckpt = 8 * hidden_bytes + max(outside_layers, per_layer)
    assert ckpt8["activation_bytes"] < none8["activation_bytes"] / 2
    assert abs(ckpt8["activation_bytes"] - expected_ckpt) / expected_ckpt < 0.15, (ckpt8["activation_bytes"], expected_ckpt)
    for layers, metrics in ((4, none4), (8, none8), (8, ckpt8)):
        assert metrics["param_bytes"] + metrics["trainable_param_bytes"] <= metrics["peak_memory_bytes"]
        # AdamW: exp_avg and exp_avg_sq per adapter tensor, plus a 0-d fp32 `step` (A and B on 7 linears per layer).
        assert metrics["optimizer_state_bytes"] == 2 * metrics["trainable_param_bytes"] + F32 * 2 * 7 * layers
        assert metrics["grad_bytes"] == metrics["trainable_param_bytes"]
        assert 0 < metrics["inference_peak_bytes"] < metrics["peak_memory_bytes"]
    # Same data, same seed, same LoRA init: checkpointing changes memory, never the loss curve.
    assert none8["loss"] == ckpt8["loss"]


def test_gradient_hooks_exist_only_around_the_traced_step():
    """Adapter gradients are retagged as GRAD by post-accumulate hooks during the traced step; the timed
    steps run without them (no tracing hook while timing)."""
    from sweepbp.train.step import counting_gradients

    model = torch.nn.Linear(4, 2)
    model.bias.requires_grad_(False)
    tracker = MemoryTracker("cpu")
    tracker.register(list(model.parameters()), TRAINABLE)
    with counting_gradients(model), tracker:
        model(torch.randn(3, 4)).sum().backward()
    assert tracker.report().category_peaks[GRAD] == model.weight.numel() * F32  # retagged by the hook
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # gone after the step


def test_a_thinned_timeline_keeps_the_peak_and_the_dips():
    """A long trace (more samples than are kept) still draws the step's exact peak."""
    from sweepbp.measure.tracker import MemoryReport, MemorySample, timeline_samples

    totals = [(i * 7919) % 10007 for i in range(50_000)]
    totals[31_337] = 20_000  # one sample above all others, at no multiple of the thinning stride
    timeline = [MemorySample(str(i), {"activation": t, "param": 5}, 0) for i, t in enumerate(totals)]
    report = MemoryReport(20_005, {}, {}, 0, 0, timeline)
    kept = timeline_samples(report, most=2000)
    drawn = [sum(s["by_category"].values()) for s in kept]
    assert len(kept) <= 2000
    assert max(drawn) == 20_005 and min(drawn) == 5
    order = [int(s["phase"]) for s in kept]  # the phase field carries each sample's index here
    assert order == sorted(order) and len(set(order)) == len(order)


def test_steps_that_spread_by_more_than_a_quarter_of_their_median_are_noisy():
    """The rule on given step times (no clock read here; benchmarks/timing_noise.py runs real jobs idle and loaded)."""
    quiet = [0.100, 0.102, 0.098, 0.101, 0.099]  # IQR 2% of the median
    busy = [0.100, 0.180, 0.095, 0.250, 0.110]  # IQR 80% of the median
    assert not is_noisy(quiet) and is_noisy(busy)
    assert not is_noisy([0.1, 0.125, 0.1, 0.125, 0.1])  # IQR 0.025 = exactly 25% of the median: not above it
    assert not is_noisy([0.3])  # one timed step has no spread
    assert TimingSummary(busy, busy, busy, busy).metrics(64, 2)["timing_noisy"] == 1.0
    assert TimingSummary(quiet, quiet, quiet, quiet).metrics(64, 2)["timing_noisy"] == 0.0


def test_a_datasets_steps_of_varied_size_are_judged_by_their_time_per_position():
    """Padded batches of 64 to 512 positions take 1 to 8 times as long, as they should: not noise."""
    positions = [64, 512, 128, 256, 96]
    steady = [p * 1e-4 for p in positions]  # the same time per position
    counts = [(int(p * 0.8), p, 2) for p in positions]
    assert is_noisy(steady)  # as plain step times they spread far
    figures = varied_throughput(steady, counts)
    assert figures["timing_noisy"] == 0.0 and figures["timing_spread"] < 1e-9
    stalled = [*steady[:4], steady[4] * 3]
    stalled[1] *= 3
    assert varied_throughput(stalled, counts)["timing_noisy"] == 1.0
