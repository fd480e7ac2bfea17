"""mode=predict: a job's own training step run on tensors without data, counted by the exact tracker.

The prediction takes the path of a real job (build_model -> apply_lora -> apply_memory_strategy ->
inference peak -> precision plugin -> AdamW in its steady state -> one traced forward/backward/AdamW
step through `module.train_step`), but on `meta` tensors: each has a shape, a dtype and a storage size
and no data, so Llama-3.1-8B fits on a laptop and a step takes seconds. `measure.MemoryTracker` counts
the meta storages exactly as it counts real ones.

Jobs with `*-mixed` precision trace on fake CPU tensors (`FakeTensorMode`) instead, because autocast only
acts on tensors of a real device type: the same accounting, about twice as slow. An offloading strategy
is given the trace's device (meta): its host copies, made inside `host_scope`, stay on meta and are
booked as host memory (`MetaTracker`), and its reloads are fresh device copies, as on a GPU.

The kernels whose choice depends on the device (attention, AdamW's implementation) are picked for the
target device by `target.py`, for CPU as for CUDA; the target is part of every prediction
(`Prediction.device`). Data-dependent branches cannot be decided without data: synthetic and text batches
hold one unpadded sequence per row, and `unpadded_sequences` decides transformers' two such branches the
way that data does; a dataset's traced step is its epoch's worst batch, planned as the job plans it, and
`data.padded_rows` decides its padding check (predict/data.py). The CPU test (predicted == measured for
every strategy and data option) is what catches a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from transformers import PreTrainedModel, masking_utils

from sweepbp.config import ConfigError, SweepbpConfig
from sweepbp.measure.tracker import MemoryReport, MemoryTracker
from sweepbp.memory import apply_memory_strategy, assert_training_mode
from sweepbp.metrics import PREDICTED
from sweepbp.predict.copying import module_copy
from sweepbp.predict.data import TracedBatch, padded_rows, traced_batch
from sweepbp.predict.depth import (
    DepthPlan,
    NotAffine,
    check_layers_repeat,
    depth_plan,
    extend_figures,
    extend_report,
)
from sweepbp.predict.target import CpuMetaTracker, MetaTracker, MetaUpdates, precision_plugin, target_kernels
from sweepbp.train.data import largest_micro_batch
from sweepbp.train.environment import pick_device
from sweepbp.train.lora import adapted_layer_names, apply_method
from sweepbp.train.model import build_model, hf_config, parameter_counts
from sweepbp.train.step import counting_gradients, inference_peak, make_optimizer, step_tracker, train_step
from sweepbp.train.quant import int8_kernels_of, quantize_model
from sweepbp.train.scopes import naming_modules


FULL, EXTRAPOLATED = "full", "extrapolated"  # predict_method


@dataclass
class Prediction:
    """What one job's step would allocate on `device`, by category, without running it."""

    device: str  # the device type predicted for: cpu or cuda
    batch_size: int
    report: MemoryReport  # the traced training step
    inference_peak_bytes: int
    parameters: dict[str, float]  # trainable_params, frozen_params, flops_per_token
    data: dict[str, float]  # a dataset's length distribution and the worst step traced (empty otherwise)
    checkpointed_layers: int
    quantized_layers: int
    adapted_layers: list[str]  # what lora.target_modules resolved to (empty for method=full)
    seconds: float  # wall time of the prediction itself
    modelled: list[str] = field(default_factory=list)  # what was chosen for the target rather than traced
    snapshot: dict | None = None  # the traced step as a memory snapshot (measure/snapshot.py), when asked for
    method: str = FULL  # full: the whole model traced; extrapolated: shallow twins traced (predict/depth.py)
    traced_depths: tuple[int, ...] = ()  # decoder layers of each trace
    depth: int = 0  # the model's own decoder layers
    full_reason: str = ""  # why a model was traced whole although depth extrapolation was planned

    def record(self) -> dict[str, str]:
        """How the prediction was made, for the job's environment (tags sweepbp.env.predict_*)."""
        entries = {"predict_method": self.method, "predict_traced_depths": ",".join(map(str, self.traced_depths))}
        if self.full_reason:
            entries["predict_full_reason"] = self.full_reason
        return entries

    @property
    def peak_bytes(self) -> int:
        """The larger of the training and inference peaks: what must fit."""
        return max(self.report.peak_bytes, self.inference_peak_bytes)

    def fits(self, budget_bytes: int | None) -> bool:
        return budget_bytes is None or self.peak_bytes <= budget_bytes

    def metrics(self) -> dict[str, float]:
        """`predicted_`-prefixed twins of the measured memory metrics, plus the prediction's own cost."""
        figures = {k: float(v) for k, v in self.report.metrics(prefix=PREDICTED).items()}
        figures[f"{PREDICTED}inference_peak_bytes"] = float(self.inference_peak_bytes)
        if self.inference_peak_bytes:
            figures[f"{PREDICTED}train_inference_memory_ratio"] = self.report.peak_bytes / self.inference_peak_bytes
        figures["predict_time_s"] = self.seconds
        return figures


def target_device(accelerator: str) -> str:
    """The device type a job with this `trainer.accelerator` runs on (cuda or cpu).

    `accelerator=gpu` names CUDA even on a machine without one: that is how a laptop predicts for a GPU.
    """
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    return pick_device(accelerator).type


def predict(cfg: SweepbpConfig, device: str, batch_size: int | None = None, keep_timeline: bool = False,
            snapshot: bool = False) -> Prediction:
    """Trace one steady-state training step of `cfg` without data, for a `device` (cpu or cuda) target;
    `snapshot`: also as a memory snapshot, with the modules named.

    A deep random-init model is traced at three shallow depths and extrapolated (predict/depth.py) when every
    figure is exactly affine in depth; otherwise, when that would not be cheaper, and for a snapshot (which is
    the whole model's step), the whole model is traced.
    """
    size = int(batch_size if batch_size is not None else cfg.batch.size)
    if cfg.quant.name != "none" and cfg.trainer.precision.endswith("-mixed"):
        raise ConfigError([f"quant={cfg.quant.name} with trainer.precision={cfg.trainer.precision} is not predicted: "
                           "autocast is traced on fake tensors, which bitsandbytes' parameters cannot wrap"])
    start = time.perf_counter()
    plan = plan_depths(cfg) if not snapshot else None
    full_reason = ""
    if plan is not None:
        try:
            layers_repeat(cfg, plan.period)
            return replace(extrapolated(cfg, device, size, plan, keep_timeline), seconds=time.perf_counter() - start)
        except NotAffine as why:
            full_reason = str(why)
    prediction = trace_step(cfg, device, size, keep_timeline, snapshot=snapshot)
    return replace(prediction, seconds=time.perf_counter() - start, full_reason=full_reason)


_REPEATS: dict[tuple[str, int], str] = {}  # (model config, period) -> "" or why its layers do not repeat


def layers_repeat(cfg: SweepbpConfig, period: int) -> None:
    """`check_layers_repeat` on the whole model built on meta, once per model and period in a process: a sweep's
    predictions (one long-lived process) mostly share their model, and each build costs the same again."""
    key = (_cache_key(cfg.model), period)
    if key not in _REPEATS:
        try:
            with torch.device("meta"):
                check_layers_repeat(build_model(cfg.model, torch.device("meta"), cfg.trainer.seed), period)
            _REPEATS[key] = ""
        except NotAffine as why:
            _REPEATS[key] = str(why)
    if _REPEATS[key]:
        raise NotAffine(_REPEATS[key])


def _cache_key(*parts) -> str:
    """A key for a process-wide cache: configs (dataclasses) and plain values as sorted JSON."""
    return json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True,
                      default=str)


def plan_depths(cfg: SweepbpConfig, cheaper_only: bool = True) -> DepthPlan | None:
    """Depth extrapolation for random-init models (a checkpoint's own loading is traced as it is)."""
    if cfg.model.pretrained_path is not None:
        return None
    return depth_plan(hf_config(cfg.model), getattr(cfg.memory, "every", 1), cheaper_only)


def extrapolated(cfg: SweepbpConfig, device: str, size: int, plan: DepthPlan, keep_timeline: bool = False) -> Prediction:
    """The prediction from traces at the plan's depths (the timeline is the deepest one's); NotAffine when a
    figure is not exactly affine in depth."""
    planned = traced_batch(cfg, size, hf_config(cfg.model).vocab_size)  # the same batch for every twin
    traces = [trace_step(cfg, device, size, keep_timeline and depth == plan.depths[-1], depth, planned=planned)
              for depth in plan.depths]
    return extrapolate(traces, plan)


def extrapolate(traces: list[Prediction], plan: DepthPlan) -> Prediction:
    """The prediction for the model's own depth from the traces at `plan.depths`; NotAffine if any figure
    is not exactly affine in depth."""
    deepest = traces[-1]
    for what in ("device", "batch_size", "adapted_layers", "modelled", "data"):
        if any(getattr(t, what) != getattr(deepest, what) for t in traces):
            raise NotAffine(f"the traces differ in {what}")

    def extend(field: str) -> int:
        return extend_figures([{field: getattr(t, field)} for t in traces], plan, field)[field]

    return replace(deepest, report=extend_report([t.report for t in traces], plan),
                   inference_peak_bytes=extend("inference_peak_bytes"),
                   parameters=extend_figures([t.parameters for t in traces], plan, "parameters"),
                   checkpointed_layers=extend("checkpointed_layers"), quantized_layers=extend("quantized_layers"),
                   method=EXTRAPOLATED, traced_depths=plan.depths, depth=plan.depth)


def trace_step(cfg: SweepbpConfig, device: str, size: int, keep_timeline: bool, depth: int | None = None,
               snapshot: bool = False, planned: TracedBatch | None = None) -> Prediction:
    """One traced step of `cfg` (of a twin with `depth` decoder layers, when given), as a snapshot too if asked;
    `planned`: its batch, when the caller planned it (else planned here)."""
    modelled: list[str] = []
    meta = torch.device("meta")
    model, quantized = adapted_model(cfg, depth)
    meta_trace = not cfg.trainer.precision.endswith("-mixed")  # autocast needs a real device type: fake CPU
    # the strategy sees the trace's device: an offload moves what lives there to the host
    applied = apply_memory_strategy(model, cfg.memory, meta if meta_trace else torch.device("cpu"))
    with (no_data(meta_trace, model, device) as counted, unpadded_sequences(), padded_rows(), scalars_without_data(),
          target_kernels(device, modelled), int8_kernels_of(model, cfg.quant, device, modelled)):
        model.train()
        assert_training_mode(model)
        planned = planned or traced_batch(cfg, size, model.config.vocab_size)
        batch = planned.tensors(cfg, counted[0])
        parameters = parameter_counts(model, cfg.batch.seq_len)
        kind = (CpuMetaTracker if device == "cpu" else MetaTracker) if meta_trace else MemoryTracker
        inference = inference_peak(model, largest_micro_batch(batch), cfg.loss, counted, kind=kind)
        plugin = precision_plugin(cfg.trainer.precision, device, modelled)
        model = plugin.convert_module(model)  # Lightning converts at fit, after the inference measurement
        optimizer = make_optimizer(model, cfg.optim, cfg.trainer.lr, cfg.trainer.weight_decay,
                                   foreach=_foreach(cfg.optim, device, modelled))
        with plugin.train_step_context():  # Lightning runs every training_step inside it
            warm_optimizer(optimizer)
            tracker = step_tracker(model, optimizer, batch, counted, None, keep_timeline, kind, snapshot)
            with counting_gradients(model), naming_modules(model, tracker), tracker:
                train_step(model, applied, cfg.loss, batch, optimizer, _backward, tracker.phase_of)
            report = tracker.report()
    layers = model.config.num_hidden_layers
    return Prediction(device=device, batch_size=size, report=report, inference_peak_bytes=inference,
                      parameters=parameters, data=planned.metrics, checkpointed_layers=applied.checkpointed_layers,
                      quantized_layers=quantized, adapted_layers=adapted_layer_names(model), seconds=0.0,
                      modelled=sorted(set(modelled)), traced_depths=(layers,), depth=layers,
                      snapshot=tracker.log.snapshot() if tracker.log is not None else None)


TWINS_KEPT = 8  # adapted twins a process keeps, the most recently used (a sweep's predictions share a few)
_TWINS: OrderedDict[str, tuple[torch.nn.Module, int]] = OrderedDict()
_BUILT_ONCE: set[str] = set()  # twins built once: kept from their second use on


def adapted_model(cfg: SweepbpConfig, depth: int | None) -> tuple[torch.nn.Module, int]:
    """The model a trace starts from, on meta: built (a twin of `depth` layers, when given), quantised (and how
    many of its layers), adapted. A twin of unquantised weights used a second time in a process is kept and handed
    out as deep copies from then on (`module_copy`), which cost about a fifth of building it
    (benchmarks/twin_copy.py): the predictions of a sweep share their model and twins, and a trace changes the model
    it runs (checkpointing wrappers, precision, gradients), so each gets its own."""
    if depth is None or cfg.quant.name != "none":  # the whole model is traced once; bitsandbytes' meta
        return built_model(cfg, depth)                # parameters cannot be deep-copied
    key = _cache_key(cfg.model, cfg.method, cfg.lora, cfg.trainer.seed, depth)  # quant: none
    if key in _TWINS:
        _TWINS.move_to_end(key)  # the most recently used
    elif key in _BUILT_ONCE:
        _TWINS[key] = built_model(cfg, depth)
        while len(_TWINS) > TWINS_KEPT:
            _BUILT_ONCE.discard(_TWINS.popitem(last=False)[0])
    else:  # a lone prediction copies nothing
        _BUILT_ONCE.add(key)
        return built_model(cfg, depth)
    twin, quantized = _TWINS[key]
    return module_copy(twin), quantized


def built_model(cfg: SweepbpConfig, depth: int | None) -> tuple[torch.nn.Module, int]:
    """`adapted_model`, built anew."""
    meta = torch.device("meta")
    with torch.device(meta):  # peft creates adapters on the default device before moving them
        base = build_model(cfg.model, meta, cfg.trainer.seed, depth)
        quantized = quantize_model(base, cfg.quant, meta)  # bitsandbytes' own quantisation, shapes only
        return apply_method(base, cfg.method, cfg.lora), quantized


@contextlib.contextmanager
def no_data(meta: bool, model: torch.nn.Module, device: str) -> Iterator[tuple[str, ...]]:
    """The tensors the trace runs on; yields the device types whose storages count as device memory.

    meta: the model stays on meta. Real CPU scalars beside it (AdamW's step counters) are device memory
    for a CPU target and host memory for a CUDA one, as in a real run. Otherwise (autocast) the meta
    model is materialised as fake CPU tensors.
    """
    if meta:
        yield ("meta", "cpu") if device == "cpu" else ("meta",)
        return
    with FakeTensorMode(allow_non_fake_inputs=True):
        to_empty_keeping_ties(model, "cpu")
        yield ("cpu",)


def to_empty_keeping_ties(model: torch.nn.Module, device: str) -> None:
    """`model.to_empty(device=...)`, with each parameter or buffer that several modules share (tied input and
    output embeddings: Llama-3.2 1B/3B, Gemma, small Qwen2.5, Falcon) still one tensor. `to_empty` makes a new one
    per module that holds it, which counted a tied embedding twice (525 MB more for Llama-3.2-1B in bf16)."""
    holders: dict[int, list[tuple[dict, str]]] = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((tensors, name))
    model.to_empty(device=device)
    for (first, first_name), *others in holders.values():
        for tensors, name in others:
            tensors[name] = first[first_name]


def warm_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Bring AdamW to the state a real job's traced step starts from (after its warm-up steps):
    exp_avg, exp_avg_sq and step per adapter tensor, gradients freed. One step on zero gradients
    creates exactly that state without tracing a warm-up forward and backward."""
    implementations = []
    for group in optimizer.param_groups:
        implementations.append(group.get("foreach"))
        if "foreach" in group:  # torch's: same state as the per-tensor loop (both start with `_init_group`), faster
            group["foreach"] = True
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    with MetaUpdates():  # the update of meta weights does nothing but its shape checks: skipped
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, foreach in zip(optimizer.param_groups, implementations):
        if "foreach" in group:
            group["foreach"] = foreach


def _foreach(optim, device: str, modelled: list[str]) -> bool | None:
    """A torch optimizer's implementation as PyTorch picks it on the target: foreach on CUDA, a per-tensor loop
    on CPU (bitsandbytes' optimizers have one)."""
    torch_names = {"adamw": "AdamW", "adafactor": "Adafactor", "sgd": "SGD"}
    if device == "cuda" and optim.name in torch_names:
        modelled.append(f"optimizer: {torch_names[optim.name]} foreach (the CUDA default)")
        return True
    return None


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


@contextlib.contextmanager
def unpadded_sequences() -> Iterator[None]:
    """Decide transformers' data-dependent checks as sweepbp's data does: one unpadded sequence per row.

    On real data `find_packed_sequence_indices` reads the position ids and returns None for unpacked
    batches, so SDPA runs its causal kernel without a mask; without data it would build an explicit
    (batch, 1, seq, seq) mask the real run never has. The padding warning reads token values (only when
    the config has a pad token; nothing it allocates outlives the check).
    """
    with contextlib.ExitStack() as stack:
        for owner, name, stand_in in ((masking_utils, "find_packed_sequence_indices", lambda position_ids: None),
                                      (PreTrainedModel, "warn_if_padding_and_no_attention_mask", lambda *args: None)):
            if hasattr(owner, name):  # older transformers releases lack one or the other
                stack.enter_context(mock.patch.object(owner, name, stand_in))
        yield


@contextlib.contextmanager
def scalars_without_data() -> Iterator[None]:
    """`Tensor.item()` of a meta tensor, or of a fake one (`*-mixed` precision's trace), gives 1.0 instead of
    raising. Adafactor's relative step size reads each weight's RMS (`p.norm().item()`) on the host: the value scales the update, it changes nothing that is
    allocated. Any other `.item()` a trace meets is caught the same way; the CPU equality test is what would
    show a branch that allocates differently by the value."""
    real = torch.Tensor.item

    def item(tensor: torch.Tensor):
        return 1.0 if tensor.device.type == "meta" or isinstance(tensor, FakeTensor) else real(tensor)

    with mock.patch.object(torch.Tensor, "item", item):
        yield
