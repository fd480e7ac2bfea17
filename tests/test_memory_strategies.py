"""Every memory strategy trains the same model and saves the memory theory says it saves (CPU, tiny model).

One traced forward+backward per strategy is shared by the tests (module fixture): the exact tracker
gives activation bytes at their peak and still live when the forward ends (= saved for the backward).
Tolerance for "same gradients / same losses": rtol=1e-5, atol=1e-6 (float32; checkpointing replays the
same kernels, so in practice the values agree bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from conftest import FAST, compose, problems_of
from steps import KeepGradients, build

from sweepbp.config import SELECTIVE_POLICIES, LossConfig, leaf_params
from sweepbp.measure.tracker import ACTIVATION, MemoryTracker
from sweepbp.memory import AppliedMemory, assert_training_mode
from sweepbp.memory.checkpoint import decoder_layers
from sweepbp.memory.selective import MATMUL_OPS, POLICIES, adapter_rank
from sweepbp.train.step import register_state, train_step

RTOL, ATOL = 1e-5, 1e-6
CPU = torch.device("cpu")
STRATEGIES = {  # label -> overrides
    "none": ["memory=none"],
    "ckpt": ["memory=ckpt"],
    "ckpt_every2": ["memory=ckpt", "memory.every=2"],
    "selective": ["memory=selective"],
    "selective_attention": ["memory=selective", "memory.policy=save_attention"],
    "offload": ["memory=offload"],
    "ckpt_offload": ["memory=ckpt_offload"],
}


def _untimed(phase: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class Trace:
    """One traced training step of one strategy."""

    activation_bytes: int  # peak of activation bytes over forward and backward
    saved_bytes: int  # activation bytes still on the device when the forward ends
    host_bytes: int
    grads: dict[str, torch.Tensor]
    applied: AppliedMemory


def traced_step(model, applied: AppliedMemory, batch: dict) -> Trace:
    """The module's own training step (`train_step`: the strategy's forward context, backward, optimizer),
    traced; the bytes still live when the backward starts are what the forward saved for it."""
    tracker = MemoryTracker("cpu")
    register_state(tracker, model, None, batch)
    optimizer = KeepGradients(model)
    saved: list[int] = []

    def backward(loss: torch.Tensor) -> None:
        saved.append(tracker.live_bytes - tracker.report().start_bytes)  # host copies are not device bytes
        loss.backward()

    with tracker:
        train_step(model, applied, LossConfig(), batch, optimizer, backward, tracker.phase_of)
    report = tracker.report()
    return Trace(report.category_peaks[ACTIVATION], saved[0], report.host_peak_bytes, optimizer.grads, applied)


@pytest.fixture(scope="module")
def traces() -> dict[str, Trace]:
    out = {}
    for label, overrides in STRATEGIES.items():
        model, applied, batches = build(overrides)
        out[label] = traced_step(model, applied, batches[0])
    return out


@pytest.mark.parametrize("label", [s for s in STRATEGIES if s != "none"])
def test_same_adapter_gradients_as_none(traces, label):
    reference, grads = traces["none"].grads, traces[label].grads
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], rtol=RTOL, atol=ATOL), name
    # checkpointing with frozen embeddings must still reach the adapters (PITFALLS: peft #137)
    for kind in ("lora_A", "lora_B"):
        assert all(g.abs().sum() > 0 for n, g in grads.items() if kind in n), kind


def test_same_loss_curve_as_none_with_dropout():
    """Three AdamW steps with adapter dropout: checkpointing must replay the same dropout masks."""
    curves = {}
    for label in ("none", "ckpt", "selective", "offload", "ckpt_offload"):
        model, applied, batches = build([*STRATEGIES[label], "lora.dropout=0.1"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(0)
        losses = []
        for step in range(3):
            loss = train_step(model, applied, LossConfig(), batches[step], optimizer, torch.Tensor.backward, _untimed)
            losses.append(loss.item())
        curves[label] = torch.tensor(losses)
    assert len(set(curves["none"].tolist())) == 3  # the adapter did learn: the curve is not flat
    for label, curve in curves.items():
        assert torch.allclose(curve, curves["none"], rtol=RTOL, atol=ATOL), (label, curve, curves["none"])


def test_activation_bytes_ordered_as_theory_says(traces):
    act = {label: t.activation_bytes for label, t in traces.items()}
    assert act["none"] > act["ckpt_every2"] > act["ckpt"]
    assert act["none"] > act["selective"] > act["ckpt"]
    assert act["none"] > act["selective_attention"] > act["ckpt"]
    assert act["selective"] > act["selective_attention"]  # saving less keeps less
    assert act["offload"] < act["none"] and act["ckpt_offload"] < act["ckpt"]


def test_offload_keeps_saved_activations_in_host_memory(traces):
    none, offload = traces["none"], traces["offload"]
    assert offload.saved_bytes < 0.01 * none.saved_bytes  # only tensors under min_bytes stay on the device
    # host memory holds exactly what the device kept for the backward without offloading
    assert offload.host_bytes + offload.saved_bytes == none.saved_bytes
    assert offload.applied.offload.stats.bytes == offload.host_bytes
    assert traces["none"].host_bytes == traces["ckpt"].host_bytes == 0


def test_ckpt_offload_offloads_exactly_the_checkpointed_layer_inputs(traces):
    ckpt, both = traces["ckpt"], traces["ckpt_offload"]
    cfg = compose(FAST).cfg
    layers = cfg.model.config["num_hidden_layers"]
    hidden_bytes = int(cfg.batch.size) * cfg.batch.seq_len * cfg.model.config["hidden_size"] * 4  # float32
    assert both.applied.checkpointed_layers == layers
    assert both.applied.offload.stats.storages == layers
    assert both.host_bytes == layers * hidden_bytes
    # what left the device is exactly what went to the host; the head's saved tensors stay (by design)
    assert both.saved_bytes == ckpt.saved_bytes - both.host_bytes


def test_eval_mode_would_silently_disable_checkpointing(traces):
    """The PITFALLS trap: HF skips checkpointing in eval mode. Ours trains in train mode, and checks it."""
    model, applied, batches = build(STRATEGIES["ckpt"], train=False)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    with pytest.raises(RuntimeError, match="eval mode"):
        assert_training_mode(model)
    in_eval = traced_step(model, applied, batches[0])
    assert in_eval.saved_bytes == traces["none"].saved_bytes  # nothing was checkpointed
    assert traces["ckpt"].saved_bytes < traces["none"].saved_bytes / 4


@pytest.mark.parametrize(("label", "layers"), [("ckpt", 4), ("ckpt_every2", 2), ("selective", 4), ("ckpt_offload", 4)])
def test_checkpointed_layer_counts(traces, label, layers):
    assert traces[label].applied.checkpointed_layers == layers


class _FullRankMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matmuls reducing over more than the adapter rank (the expensive ones)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.count = rank, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operand = MATMUL_OPS.get(func)
        if operand is not None and args[operand].shape[-1] > self.rank:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_selective_recomputes_no_full_rank_matmul():
    """save_matmuls replays full-rank matmuls from its cache; plain checkpointing runs them again."""
    counts = {}
    for label in ("none", "ckpt", "selective"):
        model, applied, batches = build(STRATEGIES[label])
        loss = model(**batches[0]).loss
        with _FullRankMatmuls(adapter_rank(model)) as counter:
            loss.backward()
        counts[label] = counter.count
    assert counts["selective"] == counts["none"] < counts["ckpt"]


def test_policies_and_fields_are_documented_params():
    assert set(SELECTIVE_POLICIES) == set(POLICIES)
    expected = {"selective": {"memory.policy", "memory.every"}, "offload": {"memory.min_bytes"},
                "ckpt_offload": {"memory.every", "memory.min_bytes"}, "ckpt": {"memory.every"}}
    for name, fields in expected.items():
        params = leaf_params(compose([f"memory={name}"]).cfg)
        assert params["memory.name"] == name
        assert fields <= params.keys(), (name, params.keys())


@pytest.mark.parametrize(("overrides", "message"), [
    (["memory=selective", "memory.policy=save_all"], "memory.policy must be one of save_matmuls, save_attention"),
    (["memory=offload", "memory.min_bytes=-1"], "memory.min_bytes must be zero or a positive number of bytes"),
    (["memory=ckpt_offload", "memory.every=0"], "memory.every must be a positive integer"),
])
def test_bad_memory_fields_are_one_line(overrides, message):
    problems = problems_of(overrides)
    assert len(problems) == 1 and message in problems[0], problems


def test_a_field_of_the_swept_memory_options_is_handed_to_hydra_as_a_one_value_sweep():
    from sweepbp.cli.main import fields_of_swept_groups
    from sweepbp.report.naming import SweepPlan

    args = ["memory=selective,ckpt", "memory.every=2", "lora.r=8", "+memory.extra=1", "batch.size=1,2"]
    rewritten = fields_of_swept_groups(args)
    assert rewritten == ["memory=selective,ckpt", "memory.every=choice(2)", "lora.r=8", "+memory.extra=1",
                         "batch.size=1,2"]
    # the sweep folder's plan (multirun.yaml keeps what Hydra was given) names it as the user typed it
    assert [(o.key, o.text, o.values) for o in SweepPlan.of(rewritten, 4).overrides][1] == ("memory.every", "2", ())


@pytest.mark.slow
def test_a_sweep_over_memory_options_sets_a_field_they_share(tmp_path):
    """`memory.every` exists in ckpt and selective, not in the default memory=none: Hydra's composition of the
    sweep's base config (without the swept overrides) refused it before the fix."""
    import json

    from conftest import run_cli

    done = run_cli(["-m", "memory=selective,ckpt", "memory.every=2", "mode=predict", "tracking=none"], cwd=tmp_path,
                   check=True)
    assert "sweep finished: 2 jobs (2 ok)" in done.stderr
    jobs = sorted(tmp_path.glob("multirun/*/*/*/results.json"))
    assert [json.loads(j.read_text())["metrics"]["checkpointed_layers"] for j in jobs] == [2.0, 2.0]  # of 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_on_cuda_uses_pinned_host_memory_and_keeps_gradients():
    cuda = torch.device("cuda", 0)
    grads = {}
    for label in ("none", "offload", "ckpt_offload"):
        model, applied, batches = build(STRATEGIES[label], device=cuda)
        batch = {k: v.to(cuda) for k, v in batches[0].items()}
        with applied.forward_context():
            loss = model(**batch).loss
            if applied.offload is not None:  # the copies' index lives until the forward context ends
                copies = list(applied.offload._copies.values())
                assert copies and all(host.is_pinned() for host in copies)
        loss.backward()
        grads[label] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    for label in ("offload", "ckpt_offload"):
        for name, grad in grads[label].items():
            assert torch.allclose(grad, grads["none"][name], rtol=RTOL, atol=ATOL), (label, name)
