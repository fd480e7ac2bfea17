"""Depth extrapolation (predict/depth.py): a prediction from shallow twins of the model equals the trace of
the whole model, byte for byte in every category, for every option that changes the step; where a figure is
not affine in depth the whole model is traced instead; predictions of a sweep share one process."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose

from sweepbp.cli.precheck import available_options
from test_predict import data_overrides
from sweeps import SMALL, alive, run_sweep, runs_of, start_sweep, sweep_dirs
from sweepbp.sweep.worker import PROCESSES_VARIABLE as PROCESSES

import sweepbp.predict.autobatch as autobatch
import sweepbp.predict.target as target
import sweepbp.predict.trace as trace
from sweepbp.job import run_job
from sweepbp.result import JobResult, Status
from sweepbp.sweep.predictor import PREFETCH, RUN, PredictionServer
from sweepbp.predict.copying import module_copy
from sweepbp.predict.depth import NotAffine, affine_at, depth_plan, pattern_period
from sweepbp.predict.trace import extrapolated, plan_depths, predict, trace_step
from sweepbp.train.model import hf_config

# Deep enough that three traced depths stop short of the model: 2,3,4 -> 5; 4,6,8 -> 10; 5,8,11 -> 14 layers.
LAYERS = {1: 5, 2: 10, 3: 14}
CASES = [  # every option of memory, loss, quant, method and optim at least once (none and ckpt: the 8B test below)
    *[[f"memory={m}"] for m in ("offload", "selective", "ckpt_offload")],
    # memory.every=2 and 3 with each mechanism at least once (ckpt with both): the period is every's
    ["memory=ckpt", "memory.every=2"], ["memory=ckpt", "memory.every=3"], ["memory=selective", "memory.every=2"],
    ["memory=ckpt_offload", "memory.every=3"],
    ["loss=chunked", "memory=ckpt"], ["loss=fused", "optim=sgd"],
    ["quant=nf4", "model.dtype=bfloat16"], ["quant=int8", "model.dtype=bfloat16", "memory=ckpt"],
    ["method=dora", "optim=adafactor"], ["method=full", "batch.accumulate=2", "optim=adamw8bit", "optim.min_8bit_size=64"],
    ["trainer.precision=bf16-mixed", "memory=ckpt"],  # autocast: the trace on fake CPU tensors
]


# Traced by every case without an override of its group, or by the Llama-3.1-8B test (memory=none, ckpt)
COVERED_ELSEWHERE = {"memory": {"none", "ckpt"}, "loss": {"standard"}, "quant": {"none"}, "method": {"lora"},
                     "optim": {"adamw"}}
NOT_PREDICTED = {"loss": {"liger"}, "optim": {"paged_adamw8bit"}}  # pre-flight refuses them with mode=predict


def test_the_cases_cover_every_option_of_the_groups_that_change_the_step():
    """A new option file of one of these groups needs a case here (as test_predict.py's equality tests do)."""
    for group in COVERED_ELSEWHERE:
        cased = {o.split("=", 1)[1] for case in CASES for o in case if o.startswith(f"{group}=")}
        expected = set(available_options(group)) - NOT_PREDICTED.get(group, set())
        assert expected <= cased | COVERED_ELSEWHERE[group], (group, expected - cased)


def same_prediction(a: trace.Prediction, b: trace.Prediction) -> None:
    """Every figure a prediction reports, equal."""
    assert a.report.peak_bytes == b.report.peak_bytes
    assert a.report.at_peak == b.report.at_peak
    assert a.report.category_peaks == b.report.category_peaks
    assert a.report.host_peak_bytes == b.report.host_peak_bytes
    assert a.inference_peak_bytes == b.inference_peak_bytes
    assert a.parameters == b.parameters
    assert (a.checkpointed_layers, a.quantized_layers) == (b.checkpointed_layers, b.quantized_layers)
    assert {k: v for k, v in a.metrics().items() if k != "predict_time_s"} == \
           {k: v for k, v in b.metrics().items() if k != "predict_time_s"}


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o))
def test_extrapolated_equals_the_full_trace_for_every_option(overrides):
    if any(o.startswith(("quant=nf4", "quant=int8", "optim=adamw8bit")) for o in overrides):
        pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    every = next((int(o.split("=")[1]) for o in overrides if o.startswith("memory.every=")), 1)
    layers = LAYERS[every]
    cfg = compose([*FAST, "mode=predict", "batch.seq_len=16", f"model.config.num_hidden_layers={layers}",
                   *overrides]).cfg
    plan = plan_depths(cfg, cheaper_only=False)  # the twins are as costly as the model at this size: forced
    assert plan is not None and plan.depths[-1] < layers and plan.period == every
    device = "cpu" if "quant" in " ".join(overrides) else "cuda"
    same_prediction(extrapolated(cfg, device, 2, plan), trace_step(cfg, device, 2, False))


@pytest.mark.parametrize("overrides", [["memory=none"], ["memory=ckpt", "optim=adafactor"], ["memory=offload"],
                                       ["quant=nf4", "model.dtype=bfloat16"], ["method=full", "optim=sgd"]],
                         ids=lambda o: " ".join(o))
def test_remembered_layouts_and_skipped_updates_change_no_figure(overrides, monkeypatch):
    """The meta trace's shortcuts (predict/target.py: output layouts remembered for the process, one output or
    several, in-place updates of meta tensors skipped) give the figures of the plain trace, with the memory cold and
    warm, for a CUDA target (foreach AdamW) and a CPU one."""
    if any(o.startswith("quant=nf4") for o in overrides):
        pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    cfg = compose([*FAST, "mode=predict", "batch.seq_len=16", "model.config.num_hidden_layers=3", *overrides]).cfg
    devices = ["cpu"] if "quant" in " ".join(overrides) else ["cuda", "cpu"]
    for device in devices:
        monkeypatch.setattr(target, "_LAYOUTS", {})
        cold, warm = trace_step(cfg, device, 2, False), trace_step(cfg, device, 2, False)
        assert target._LAYOUTS, "no layout was remembered"
        several = {key[0] for key, layouts in target._LAYOUTS.items() if layouts is not None and len(layouts) > 1}
        assert torch.ops.aten.nll_loss_forward.default in several  # the loss and its total weight: a tuple
        if device == "cuda" and "optim=" not in " ".join(overrides):
            assert torch.ops.aten._foreach_sqrt.default in several  # foreach AdamW: a list
        with monkeypatch.context() as plain:
            plain.setattr(target, "_layout_key", lambda *args: None)
            plain.setattr(target, "_updates_meta_in_place", lambda *args: False)
            reference = trace_step(cfg, device, 2, False)
        for fast in (cold, warm):
            same_prediction(fast, reference)
            assert fast.report.phases == reference.report.phases  # each phase's figures, not only the step's peak


@pytest.mark.parametrize("overrides", [["memory=ckpt"], ["memory=offload", "method=dora"],
                                       ["quant=nf4", "model.dtype=bfloat16"], ["quant=int8", "memory=selective"],
                                       ["method=full", "optim=adamw8bit"]], ids=lambda o: " ".join(o))
def test_a_twin_traced_from_a_kept_copy_equals_one_built_for_it(overrides, monkeypatch):
    """A process keeps an adapted twin it builds a second time and traces deep copies of it (predict/trace.py; not
    of quantised weights, which are built each time): the first copy and a later one give every figure and phase
    of a twin built for the trace."""
    if any(o.startswith(("quant=", "optim=adamw8bit")) for o in overrides):
        pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    cfg = compose([*FAST, "mode=predict", "batch.seq_len=16", "model.config.num_hidden_layers=4", *overrides]).cfg
    monkeypatch.setattr(trace, "_TWINS", trace.OrderedDict())
    monkeypatch.setattr(trace, "_BUILT_ONCE", set())
    _, first, later = (trace_step(cfg, "cpu", 2, False, depth=3) for _ in range(3))  # built, kept, copied
    assert len(trace._TWINS) == (0 if cfg.quant.name != "none" else 1)
    monkeypatch.setattr(trace, "adapted_model", trace.built_model)
    built = trace_step(cfg, "cpu", 2, False, depth=3)
    for copied in (first, later):
        same_prediction(copied, built)
        assert copied.report.phases == built.report.phases


def structure(root, original_ids: frozenset[int] = frozenset()) -> tuple[list, list]:
    """Everything reachable from `root` through object attributes and containers, in visiting order: each object's
    type, whether it is an object of the original (a copy must share only what deepcopy shares), which earlier
    object it is if seen before (ties), and for tensors their layout, flags and which storage they share; and the
    objects visited (kept alive by the caller, so that their ids stay theirs)."""
    visited: list = []
    seen: dict[int, int] = {}
    storages: dict[int, int] = {}  # which tensors share a storage (a view of a parameter), in visiting order
    out: list = []

    def visit(value):
        if id(value) in seen:
            out.append(("again", seen[id(value)]))
            return
        seen[id(value)] = len(seen)
        visited.append(value)
        entry = [type(value).__name__, id(value) in original_ids]
        out.append(entry)
        if isinstance(value, torch.Tensor):
            storage = storages.setdefault(value.untyped_storage()._cdata, len(storages))
            entry += [tuple(value.shape), value.stride(), value.dtype, value.device.type, value.requires_grad, storage]
            visit(getattr(value, "__dict__", {}))
        elif isinstance(value, dict):
            for key, item in value.items():
                out.append(("key", key if isinstance(key, (str, int)) else type(key).__name__))
                visit(item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in (sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value):
                visit(item)
        elif isinstance(value, (str, int, float, bool, type(None))):
            entry.append(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type) and (
                isinstance(value, torch.nn.Module) or not callable(value)):
            visit(vars(value))

    visit(root)
    return out, visited


@pytest.mark.parametrize("overrides", [[], ["method=dora"], ["method=full"], ["model=llama3_2_1b"]],
                         ids=lambda o: " ".join(o) or "lora")
def test_module_copy_is_copy_deepcopy(overrides):
    """The kept twins' copies (predict/copying.py) are `copy.deepcopy`'s: the same objects, ties and tensors, sharing
    nothing with the twin that deepcopy does not share too. llama3_2_1b: tied input and output embeddings."""
    cfg = compose([*FAST, "mode=predict", *overrides]).cfg
    twin, _ = trace.built_model(cfg, 2)
    _, originals = structure(twin)
    original = frozenset(id(v) for v in originals)
    deep, fast = copy.deepcopy(twin), module_copy(twin)
    copied, _ = structure(fast, original)
    assert copied == structure(deep, original)[0]
    assert len(copied) > 1000 and not copied[0][1]  # every module, hook dict and tensor; the root is a new one
    tensors = [entry for entry in copied if isinstance(entry, list) and entry[0] in ("Parameter", "Tensor")]
    assert sum(not shared for _, shared, *_ in tensors) == len(
        list(twin.parameters())) + len(list(twin.buffers()))  # each tensor copied once, ties kept


def test_a_trace_never_sees_what_an_earlier_one_did_to_its_twin(monkeypatch):
    """Checkpointing wrappers and a bf16 conversion of one trace stay out of the next trace of the same twin."""
    changing = compose([*FAST, "mode=predict", "memory=ckpt", "trainer.precision=bf16-true"]).cfg
    plain = compose([*FAST, "mode=predict"]).cfg
    monkeypatch.setattr(trace, "_TWINS", trace.OrderedDict())
    monkeypatch.setattr(trace, "_BUILT_ONCE", set())
    trace_step(plain, "cuda", 2, False, depth=2)  # built once: the next use keeps it
    trace_step(changing, "cuda", 2, False, depth=2)
    after = trace_step(plain, "cuda", 2, False, depth=2)
    assert len(trace._TWINS) == 1  # both traced copies of one twin
    monkeypatch.setattr(trace, "adapted_model", trace.built_model)
    built = trace_step(plain, "cuda", 2, False, depth=2)
    same_prediction(after, built)
    assert after.report.phases == built.report.phases


@pytest.mark.parametrize("option", ["jsonl", "parquet"])
def test_extrapolated_equals_the_full_trace_for_a_dataset(option, data_files):
    """A dataset's worst step (padded: a mask, repeated K/V; or a mask of ones), planned once for every twin."""
    cfg = compose([*FAST, "mode=predict", f"data={option}", *data_overrides(option, data_files),
                   "model.config.num_hidden_layers=5"]).cfg
    plan = plan_depths(cfg, cheaper_only=False)
    fast = extrapolated(cfg, "cuda", 2, plan)
    assert fast.data["worst_batch_tokens"] > 0
    same_prediction(fast, trace_step(cfg, "cuda", 2, False))
    assert fast.data == trace_step(cfg, "cuda", 2, False, depth=2).data


@pytest.mark.parametrize("overrides", [["memory=none"], ["memory=ckpt"],
                                       # the peak moves from the loss (2 layers) to the backward (3, 4, 32):
                                       # extrapolated phase by phase, not as one curve
                                       ["memory=ckpt", "method=full", "optim=adamw8bit"]], ids=" ".join)
def test_llama3_8b_extrapolated_equals_its_full_trace(overrides):
    if "optim=adamw8bit" in overrides:
        pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    cfg = compose(["model=llama3_8b", "mode=predict", "lora.r=16", "batch.size=1", "batch.seq_len=2048",
                   *overrides]).cfg
    fast = predict(cfg, "cuda")
    assert (fast.method, fast.traced_depths, fast.depth) == ("extrapolated", (2, 3, 4), 32)
    same_prediction(fast, trace_step(cfg, "cuda", 1, False))


@pytest.mark.parametrize("overrides", [["memory=ckpt", "lora.r=64", "batch.seq_len=16"],
                                       ["method=full", "optim=sgd", "optim.momentum=0", "memory=ckpt"]],
                         ids=" ".join)
def test_far_beyond_the_twins_the_prediction_is_still_the_full_trace(overrides):
    """24 layers from twins of 2, 3 and 4: whatever moves between the twins and the model shows here."""
    cfg = compose([*FAST, "mode=predict", "batch.size=1", "model.config.num_hidden_layers=24", *overrides]).cfg
    fast = predict(cfg, "cuda")
    assert fast.method == "extrapolated", fast.full_reason
    same_prediction(fast, trace_step(cfg, "cuda", 1, False))


def test_a_peak_that_would_move_within_its_phase_is_traced_whole():
    """Full fine-tuning with SGD: at 2 to 4 layers the backward peaks where every layer's gradient exists (its
    end), but the activations it starts with grow faster with depth and overtake that peak by 16 layers; the
    twins cannot show it, their figures are affine. The plan sees the backward's entry outgrow its peak."""
    cfg = compose([*FAST, "mode=predict", "batch.size=1", "batch.seq_len=128", "model.config.num_hidden_layers=16",
                   "model.config.vocab_size=8192", "method=full", "optim=sgd"]).cfg
    with pytest.raises(NotAffine, match="backward phase's peak grows by"):
        extrapolated(cfg, "cuda", 1, plan_depths(cfg, cheaper_only=False))
    fallback = predict(cfg, "cuda")
    assert fallback.method == "full" and "may move in a deeper model" in fallback.full_reason
    full = trace_step(cfg, "cuda", 1, False)
    assert fallback.report.phases["backward"].peak_bytes == full.report.phases["backward"].peak_bytes


def test_auto_batch_is_the_same_with_extrapolated_predictions(monkeypatch):
    cfg = compose([*FAST, "mode=predict", "batch.seq_len=16", "model.config.num_hidden_layers=10"])
    plan = plan_depths(cfg.cfg)
    assert plan is not None and plan.depths == (2, 3, 4)  # 9 layers traced for 10
    fast = autobatch.BatchSearch(cfg, "cuda", budget=0)
    budget = (fast.peak(2) + fast.peak(3)) // 2
    fast.budget = budget
    monkeypatch.setattr(autobatch, "predict", lambda c, d, batch_size: trace_step(c, d, batch_size, False))
    full = autobatch.BatchSearch(cfg, "cuda", budget)
    assert fast.largest() == full.largest() == 2
    assert all(full.peak(size) == peak for size, peak in fast.peaks.items())


def test_layer_patterns_set_the_period_and_a_curve_must_be_affine():
    gemma = compose(["model=gemma2_9b", "mode=predict", "tracking=none"]).cfg
    plan = depth_plan(hf_config(gemma.model), every=1)
    assert plan is not None and plan.period == 2 and plan.depths == (4, 6, 8)  # sliding and full alternate
    assert depth_plan(hf_config(gemma.model), every=3, cheaper_only=False).period == 6
    assert pattern_period(["a", "b", "a", "b", "a", "b"]) == 2
    assert pattern_period(["a", "a", "a", "b"]) is None  # a pattern that does not repeat: traced whole
    assert affine_at([10, 17, 24], (2, 3, 4), 32) == 10 + 30 * 7
    assert affine_at([10, 17, 25], (2, 3, 4), 32) is None


def test_a_figure_that_is_not_affine_falls_back_to_the_full_trace(monkeypatch):
    cfg = compose([*FAST, "mode=predict", "tracking=none", "model.config.num_hidden_layers=12"]).cfg
    real = trace.trace_step

    def off_by_a_byte(cfg, device, size, keep_timeline, depth=None, **kwargs):
        prediction = real(cfg, device, size, keep_timeline, depth, **kwargs)
        return replace(prediction, inference_peak_bytes=prediction.inference_peak_bytes + (depth == 3))

    monkeypatch.setattr(trace, "trace_step", off_by_a_byte)
    fallback = predict(cfg, "cpu")
    assert fallback.method == "full" and fallback.traced_depths == (12,)
    assert "inference_peak_bytes is not affine in depth" in fallback.full_reason
    assert fallback.record()["predict_full_reason"] == fallback.full_reason


def test_layers_that_do_not_repeat_are_traced_whole_and_checked_once_per_model(monkeypatch):
    """The whole-model check (check_layers_repeat) runs once per model and period in a process; its verdict,
    a refusal too, holds for the next prediction of the same model (a sweep's predictions share one process)."""
    cfg = compose([*FAST, "mode=predict", "tracking=none", "model.config.num_hidden_layers=13"]).cfg
    checked: list[int] = []

    def layer_3_differs(model, period):
        checked.append(period)
        raise NotAffine("decoder layer 3 differs from layer 0")

    monkeypatch.setattr(trace, "check_layers_repeat", layer_3_differs)
    first, second = predict(cfg, "cpu"), predict(replace(cfg, batch=replace(cfg.batch, size=1)), "cpu")
    assert [p.method for p in (first, second)] == ["full", "full"]
    assert first.full_reason == second.full_reason == "decoder layer 3 differs from layer 0"
    assert checked == [1]


def test_a_measured_deep_model_equals_its_extrapolated_prediction():
    result = run_job(compose([*FAST, "tracking=none", "model.config.num_hidden_layers=10", "memory=ckpt"]))
    assert result.status == "ok", result.error
    assert result.environment["predict_method"] == "extrapolated"
    assert result.environment["predict_traced_depths"] == "2,3,4"
    for name in ("peak_memory_bytes", "activation_bytes", "grad_bytes", "inference_peak_bytes", "other_bytes"):
        assert result.metrics[f"predicted_{name}"] == result.metrics[name], name


@pytest.mark.slow
def test_a_predict_sweep_runs_its_jobs_in_one_process_with_every_record(tmp_path: Path):
    args = ["mode=predict", "memory=none,ckpt", "model.config.num_hidden_layers=12", *SMALL]
    code, stderr = run_sweep(args, tmp_path, {PROCESSES: "1"})  # as on a 2-CPU machine, on any machine
    assert code == 0, stderr
    assert "Traceback" not in stderr  # the prediction process ends by itself at the sweep's exit, unterminated
    folders = sorted(p for p in sweep_dirs(tmp_path)[0].iterdir() if p.is_dir() and p.name.isdigit())
    records = [json.loads((f / "results.json").read_text()) for f in folders]
    assert [r["status"] for r in records] == ["ok"] * 2
    assert len({r["environment"]["job_pid"] for r in records}) == 1  # one prediction process, no job start each
    assert {r["environment"]["predict_method"] for r in records} == {"extrapolated"}
    assert all((f / "memory_timeline.png").exists() and (f / "config.yaml").exists() for f in folders)
    jobs, parents = runs_of(tmp_path)
    assert len(jobs) == 2 and len(parents) == 1
    assert {r.data.tags["sweepbp.env.predict_method"] for r in jobs} == {"extrapolated"}
    assert all(r.data.metrics["predicted_peak_memory_bytes"] > 0 for r in jobs)


@pytest.mark.slow
def test_two_prediction_processes_deal_a_sweep_out_in_turn(tmp_path: Path):
    """SWEEPBP_PREDICTION_PROCESSES=2 (the default on 3 CPUs): jobs 1 and 3 in one process, 2 and 4 in the
    other, each record what the job predicts by itself."""
    overrides = ["mode=predict", "memory=none,ckpt", "batch.size=1,2", *SMALL]
    code, stderr = run_sweep(overrides, tmp_path, {PROCESSES: "2"})
    assert code == 0, stderr
    folders = sorted((p for p in sweep_dirs(tmp_path)[0].iterdir() if p.is_dir() and p.name.isdigit()),
                     key=lambda p: int(p.name))
    records = [json.loads((f / "results.json").read_text()) for f in folders]
    pids = [r["environment"]["job_pid"] for r in records]
    assert pids[0] == pids[2] != pids[1] == pids[3]
    for record in records:
        alone = run_job(compose([f"memory={record['choices']['memory']}", f"batch.size={record['config']['batch']['size']}",
                                 "mode=predict", "tracking=none", *SMALL]))
        assert record["metrics"]["predicted_peak_memory_bytes"] == alone.metrics["predicted_peak_memory_bytes"]


@pytest.mark.slow
def test_sigterm_during_a_prediction_records_it_killed_and_ends_the_prediction_process(tmp_path: Path):
    sweep = start_sweep(["mode=predict", "trainer.seed=0,1,2", *SMALL], tmp_path,
                        {"SWEEPBP_FAULT_HANG_SEED": "1", "SWEEPBP_FAULT_MARK": str(tmp_path / "job.pid"),
                         PROCESSES: "1"})
    job_pid = int(sweep.wait_for_file(tmp_path / "job.pid", 300))  # predicting seed 1 (maybe ahead of the sweep)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("multirun/*/*/0/results.json")) and time.monotonic() < deadline:
        time.sleep(0.1)  # job 0 recorded (so the store exists and can be read meanwhile)
    while not _opened(runs_of(tmp_path)[0], 2) and time.monotonic() < deadline:
        time.sleep(0.2)  # job 1's run opened with all its params: the sweep now waits for seed 1's prediction
    time.sleep(1)  # and has returned from that store call (a stop inside one leaves the run as kill -9 would)
    sweep.signal_group(signal.SIGTERM)  # what SLURM sends at a time limit: the sweep and its processes

    assert sweep.finish(60) == 143
    assert "Traceback" not in sweep.stderr
    assert not alive(job_pid)
    jobs, parents = runs_of(tmp_path)
    assert [(r.data.params["trainer.seed"], r.data.tags["sweepbp.status"]) for r in jobs] == [("0", "ok"), ("1", "killed")]
    assert parents[0].info.status == "KILLED"
    first = json.loads((sweep_dirs(tmp_path)[0] / "0" / "results.json").read_text())
    assert first["environment"]["job_pid"] == str(job_pid)  # the same process served both predictions


def _opened(jobs: list, count: int) -> bool:
    """`count` job runs, the last with every param of the first: a stop before that would cut its opening
    short (a store call is not held back, so such a run stays without params, as after kill -9)."""
    return len(jobs) >= count and len(jobs[count - 1].data.params) == len(jobs[0].data.params)


class Stopped(BaseException):
    pass


def test_the_prediction_process_predicts_each_job_once_and_answers_as_asked():
    """sweep/predictor.py with a stand-in for run_job: announced jobs predicted once, in order, whatever order
    they are asked in; a job recorded elsewhere gets the shared prediction with its own tracking config; a job
    asked in another environment is predicted anew."""
    made: list[int] = []

    def run_job(run, output_dir=None):
        made.append(run.cfg.trainer.seed)
        return JobResult.of(run, Status.OK, environment={"X": os.environ.get("X", "")})

    runs = [compose([*FAST, "mode=predict", "tracking=none", f"trainer.seed={seed}"]) for seed in range(5)]
    sweep_end, process_end = mp.Pipe(duplex=True)
    serving = threading.Thread(target=PredictionServer(process_end, run_job, Stopped).serve, daemon=True)
    serving.start()
    environ = {k: v for k, v in os.environ.items() if k != "X"}
    sweep_end.send((PREFETCH, runs, environ))

    def ask(run, env=environ) -> JobResult:
        sweep_end.send((RUN, run, env, None))
        assert sweep_end.poll(30)
        return JobResult.from_json(sweep_end.recv())

    assert ask(runs[2]).config["trainer"]["seed"] == 2  # asked out of order, as after resume=true skips
    elsewhere = compose([*FAST, "mode=predict", "tracking.experiment=other", "trainer.seed=0"])
    assert ask(elsewhere).config["tracking"]["experiment"] == "other"  # the announced job's prediction, restamped
    assert ask(runs[3]).environment["X"] == ""
    deadline = time.monotonic() + 60
    while 1 not in made and time.monotonic() < deadline:
        time.sleep(0.05)  # announced job 1 predicted ahead (a request would otherwise jump the queue)
    assert ask(runs[1], {**environ, "X": "set"}).environment["X"] == "set"  # another environment: made again
    # what the sweep's own libraries set after the announcement (MLflow when it opens the store, matplotlib when
    # it draws the first chart) is no other environment: the prediction made ahead is the answer
    while 4 not in made and time.monotonic() < deadline:
        time.sleep(0.05)
    libraries_set = {**environ, "_MLFLOW_TELEMETRY_SESSION_ID": "a1", "MLFLOW_TRACKING_URI": "sqlite:///m.db",
                     "MPLCONFIGDIR": "/tmp/matplotlib-x2bzhks7"}
    assert ask(runs[4], libraries_set).config["trainer"]["seed"] == 4
    sweep_end.close()
    serving.join(10)
    assert not serving.is_alive()
    assert sorted(made) == [0, 1, 1, 2, 3, 4]
