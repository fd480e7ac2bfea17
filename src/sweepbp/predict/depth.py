"""Depth extrapolation: a deep model's prediction from traces of the same model with a few layers.

The decoder layers of a model are identical, so with everything else fixed, each figure of a step (every
category's bytes at the peak, every category's own peak, the inference peak, the parameter counts) is an
affine function of the depth once the depth is past the first and last layer: one more layer adds the same
bytes. What can change with depth is *where* the peak is (the forward's activations grow with depth, an
optimizer's temporaries with the trained weights, the loss's logits not at all), so each phase of the step is
extrapolated on its own and the step's peak is the largest phase's, as the tracker itself takes it.

The plan traces three depths d, d + p, d + 2p, where p is the period of the layer pattern (memory.every of a
checkpointing strategy, a model's alternating attention types) and d is congruent to the model's depth modulo p,
so that the layers next to the output are of the same kind as in the full model, and d > p, so that the first
layer (whose input needs no gradient) is not among the last period's: at d = 2 with every=2 the only
checkpointed layer is the first, whose recompute keeps less, and the backward's peak differs by 128 bytes from
the line through the deeper twins. Every figure of the three
traces must have a zero second difference, to the byte; then it is extended to the model's depth. If any figure
does not, the caller traces the whole model instead (`predict_method: full`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sweepbp.measure.tracker import CATEGORIES, MemoryReport, PhasePeak
from sweepbp.memory.checkpoint import decoder_layers
from sweepbp.train.model import per_layer_lists

POINTS = 3  # depths traced: three points give the second difference that proves the figures affine
INDEX_FIELDS = ("layer_idx", "layer_id", "layer_index")  # a layer's own number: the one setting layers may differ in


@dataclass(frozen=True)
class DepthPlan:
    """Which depths to trace for a model of `depth` layers."""

    depth: int
    depths: tuple[int, ...]
    period: int


def depth_plan(config: Any, every: int, cheaper_only: bool = True) -> DepthPlan | None:
    """The depths to trace for a Hugging Face model config, or None when the layers follow no pattern that
    repeats (a per-layer list without a period), the model is no deeper than the traces, or (`cheaper_only`)
    the traces together hold as many layers as the model."""
    depth = int(config.num_hidden_layers)
    period = every
    for values in per_layer_lists(config).values():
        pattern = pattern_period(values)
        if pattern is None:
            return None
        period = math.lcm(period, pattern)
    shallowest = period + 1  # a first layer and a whole period after it
    first = shallowest + (depth - shallowest) % period
    depths = tuple(first + i * period for i in range(POINTS))
    if depths[-1] >= depth or (cheaper_only and sum(depths) >= depth):  # no cheaper than one trace of the model
        return None
    return DepthPlan(depth, depths, period)


def pattern_period(values: Sequence) -> int | None:
    """The smallest p with values[i] == values[i % p] for every i, if the pattern repeats at least twice."""
    for period in range(1, len(values) // 2 + 1):
        if all(values[i] == values[i % period] for i in range(len(values))):
            return period
    return None


def affine_at(values: Sequence[float], depths: Sequence[int], depth: int) -> float | None:
    """The value at `depth` of an affine function sampled at evenly spaced `depths`, or None if the samples are
    not exactly affine (a non-zero second difference)."""
    first, second, third = values
    if first - 2 * second + third != 0:
        return None
    step = depths[1] - depths[0]
    # exact in integers: the samples are byte counts (or parameter counts); the depth is a whole number of periods away
    periods = (depth - depths[0]) // step
    return first + periods * (second - first)


class NotAffine(ValueError):
    """A figure of the traces is not affine in depth: the model is traced whole instead."""


def check_layers_repeat(model: torch.nn.Module, period: int) -> None:
    """The model's decoder layers repeat with the plan's period: NotAffine where they do not.

    Config fields that make layers differ without being a per-layer list (an index list of dense layers in a
    mixture of experts, a count of leading dense layers) cannot be seen in the config; they show in the layers
    built from it (on meta: no memory, about 0.1 s for 70B): their modules, parameter shapes and settings.
    """
    signatures = [layer_signature(layer) for layer in decoder_layers(model)]
    for index, signature in enumerate(signatures):
        if signature != signatures[index % period]:
            raise NotAffine(f"decoder layer {index} differs from layer {index % period}: the layers do not repeat "
                            f"every {period}")


def layer_signature(layer: torch.nn.Module) -> tuple:
    """What a decoder layer is made of, but for its index: each module's class and plain settings (sliding
    window, attention type, ...) and each parameter's shape and dtype."""
    modules = tuple((name, type(module).__name__,
                     tuple(sorted((key, repr(value)) for key, value in vars(module).items()
                                  if isinstance(value, (int, float, str, bool, type(None)))
                                  and not key.startswith("_") and key not in INDEX_FIELDS)))
                    for name, module in layer.named_modules())
    parameters = tuple((name, tuple(param.shape), str(param.dtype)) for name, param in layer.named_parameters())
    return modules, parameters


def _extend(values: Sequence[float], plan: DepthPlan, what: str) -> Any:
    value = affine_at(values, plan.depths, plan.depth)
    if value is None:
        raise NotAffine(f"{what} is not affine in depth: {list(values)} at {list(plan.depths)} layers")
    return type(values[0])(value)


def extend_figures(samples: Sequence[dict[str, float]], plan: DepthPlan, what: str) -> dict[str, float]:
    """Each figure of a dict (the same keys at every traced depth) extended to the model's depth."""
    keys = samples[0].keys()
    if any(s.keys() != keys for s in samples):
        raise NotAffine(f"{what}: the traces report different figures")
    return {key: _extend([s[key] for s in samples], plan, f"{what} {key}") for key in keys}


def extend_report(reports: Sequence[MemoryReport], plan: DepthPlan) -> MemoryReport:
    """The step's report at the model's depth, phase by phase; the timeline is the deepest trace's."""
    names = list(reports[-1].phases)
    if any(list(r.phases) != names for r in reports):
        raise NotAffine("the traces pass through different phases")
    for report in reports:  # the per-phase figures give back each traced report exactly
        if combine(report.phases, report) != report:
            raise NotAffine("a traced report is not the combination of its phases")
    phases = {name: _extend_phase([r.phases[name] for r in reports], plan, name) for name in names}
    start = _extend([r.start_bytes for r in reports], plan, "the step's starting bytes")
    return combine(phases, replace(reports[-1], start_bytes=start))


def _extend_phase(samples: Sequence[PhasePeak], plan: DepthPlan, name: str) -> PhasePeak:
    def each(field: Callable[[PhasePeak], dict[str, int]], what: str) -> dict[str, int]:
        return {c: _extend([field(s)[c] for s in samples], plan, f"{name} {what} {c}") for c in CATEGORIES}

    def one(field: Callable[[PhasePeak], int], what: str) -> int:
        return _extend([field(s) for s in samples], plan, f"{name} {what}")

    extended = PhasePeak(peak_bytes=one(lambda s: s.peak_bytes, "peak"), at_peak=each(lambda s: s.at_peak, "at its peak"),
                         category_peaks=each(lambda s: s.category_peaks, "peak of"),
                         host_peak_bytes=one(lambda s: s.host_peak_bytes, "host peak"),
                         first_event=samples[-1].first_event, entry_bytes=one(lambda s: s.entry_bytes, "entry"),
                         exit_bytes=one(lambda s: s.exit_bytes, "exit"))
    _stays_the_peak(samples, name)
    return extended


def _stays_the_peak(samples: Sequence[PhasePeak], name: str) -> None:
    """The phase's peak keeps its place in the phase at every depth beyond the twins.

    A phase's moments are of two kinds: those counted from its start (before and during its first layers: they
    hold what the phase found, e.g. the backward's start holds every layer's activations) and those counted from
    its end (its last layers and after: e.g. every layer's gradient). Within each kind, one more layer adds the
    same bytes to every moment; the phase's entry is a moment of the first kind and its exit one of the second.
    If the peak grows by less per period than the entry or the exit, a moment of the other kind can overtake it
    beyond the twins (a full fine-tuning backward whose gradients outgrow its activations), unseen in them.
    """
    growth = {what: getattr(samples[1], what) - getattr(samples[0], what)
              for what in ("peak_bytes", "entry_bytes", "exit_bytes")}
    if growth["peak_bytes"] < max(growth["entry_bytes"], growth["exit_bytes"]):
        raise NotAffine(f"the {name} phase's peak grows by {growth['peak_bytes']} bytes per period, its entry or exit "
                        f"by more ({growth['entry_bytes']}, {growth['exit_bytes']}): its peak may move in a deeper model")


def combine(phases: dict[str, PhasePeak], template: MemoryReport) -> MemoryReport:
    """A step's report from its phases' figures, as the tracker takes them: the peak is the highest phase's
    (the earliest to reach it on a tie), each category's peak the highest of the phases'."""
    top = min(phases.values(), key=lambda p: (-p.peak_bytes, p.first_event))
    category_peaks = {c: max(p.category_peaks[c] for p in phases.values()) for c in CATEGORIES}
    return replace(template, peak_bytes=top.peak_bytes, at_peak=dict(top.at_peak), category_peaks=category_peaks,
                   host_peak_bytes=max(p.host_peak_bytes for p in phases.values()), phases=phases)
