"""The sweep's answer, computed from its job records alone: rows, Pareto frontier, budgets, what each option costs.

Pure functions over `Record`s, which come from the results.json files of a sweep folder or from the
runs of a tracking store (sweepbp.tracking), so the same summary can be rebuilt on another machine.
Nothing heavy is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sweepbp.config import GB, dotted_leaves
from sweepbp.metrics import PREDICTED, Shown, shown
from sweepbp.result import JobResult, Status
from sweepbp.tracking import RUN_ID

STRATEGY = "memory"  # the group whose options are compared against BASELINE
BASELINE = "none"
# Metrics of a summary row, in column order (the catalogue's); a column appears when some job has it (or
# its predicted_ twin).
ROW_METRICS = shown(Shown.CSV)


@dataclass
class Record:
    """One job as the report sees it, whichever source it was read from."""

    job: str  # the job's number in its sweep ("0", "1", ...)
    status: Status
    config: dict[str, str]  # every config leaf under its dotted path, as a string
    choices: dict[str, str]  # group -> option, e.g. memory -> ckpt
    metrics: dict[str, float]
    error: str | None = None
    run_id: str | None = None  # the job's run in the tracking store, when it was tracked
    resumed: bool = False  # resume=true reused an earlier run's result instead of running it again

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    @classmethod
    def from_result(cls, result: JobResult, job: str, run_id: str | None = None) -> "Record":
        """A record of a job's result (its results.json, or what a store holds of it)."""
        figures = {k: float(v) for k, v in result.metrics.items() if _is_number(v)}
        return cls(job=str(job), status=result.status, config=dotted_leaves(result.config),
                   choices={k: v for k, v in result.choices.items() if v}, metrics=figures, error=result.error,
                   run_id=run_id or result.environment.get(RUN_ID),
                   resumed=bool(result.environment.get("resumed_from_run_id")))

    @property
    def strategy(self) -> str:
        return self.choices.get(STRATEGY) or self.config.get(f"{STRATEGY}.name", "")

    def option(self, axis: Axis) -> str:
        """This job's option of an axis's group (its baseline for records from before the group existed)."""
        if "." in axis.group:  # a field, not a group
            return self.config.get(axis.group) or axis.baseline
        return self.choices.get(axis.group) or self.config.get(f"{axis.group}.name") or axis.baseline

    def value(self, key: str) -> str:
        """A swept key's value: a group's option name or a dotted config leaf."""
        return self.choices[key] if key in self.choices else self.config.get(key, "")

    def metric(self, name: str) -> float | None:
        value = self.metrics.get(name)
        return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Axis:
    """A config group whose options the summary compares with its baseline at the same other settings."""

    group: str  # a group (`loss`), or a field (`lora.adapter_dtype`)
    baseline: str  # the option the others are compared with (also what records from before the group ran)
    title: str  # what one option is called in the report's heading
    focus: str  # the memory figure the group acts on, compared beside the peak


# The axes compared in "what it costs", in the report's order.
AXES = (Axis(STRATEGY, BASELINE, "memory strategy", "activation_bytes"),
        Axis("loss", "standard", "loss", "logits_bytes"),
        Axis("quant", "none", "quantisation", "param_bytes"),
        Axis("method", "lora", "method", "grad_bytes"),
        Axis("optim", "adamw", "optimizer", "optimizer_state_bytes"),
        Axis("lora.adapter_dtype", "float32", "adapter precision", "activation_bytes"),
        Axis("batch.accumulate", "1", "gradient accumulation", "grad_bytes"),
        # a dataset's batching (data=jsonl, parquet): per real token (tokens_per_s counts no padding)
        Axis("data.packing", "False", "packing", "activation_bytes"),
        Axis("data.pad_to", "longest", "padding length", "activation_bytes"),
        Axis("data.order", "shuffle", "data order", "activation_bytes"))


@dataclass
class Effect:
    """What one option of an axis costs against the axis's baseline at the same other settings."""

    axis: Axis
    record: Record
    baseline: Record
    slowdown: float | None  # baseline throughput / this throughput (1.3 = 30% slower)
    memory_saving: float | None  # 1 - peak / baseline peak (0.2 = 20% less peak memory)
    focus_saving: float | None  # 1 - focus / baseline focus (the axis's own memory figure)
    names: tuple[str, str, str] = ("tokens_per_s", "peak_memory_bytes", "activation_bytes")  # as compared


@dataclass
class Summary:
    """Everything the report writes, computed once."""

    records: list[Record]
    keys: list[str]  # what identifies a job: the strategy and every other swept key
    x: str  # the metric on the chart's x axis (memory), as found in the records
    y: str  # the metric on the y axis (throughput), as found in the records
    budgets: list[float] = field(default_factory=list)  # bytes
    frontier: list[Record] = field(default_factory=list)  # Pareto-optimal ok jobs, by increasing x
    effects: list[Effect] = field(default_factory=list)

    @property
    def metric_columns(self) -> list[str]:
        return metric_columns(self.records, [self.x, self.y])


def summarize(records: list[Record], x: str = "peak_memory_bytes", y: str = "tokens_per_s",
              budgets_gb: list[float] | None = None) -> Summary:
    """The summary of a sweep; budgets default to the distinct `budget_gb` the jobs ran under."""
    records = sorted(records, key=lambda r: _job_order(r.job))
    x, y = resolve_metric(records, x), resolve_metric(records, y)
    budgets = budgets_gb if budgets_gb else config_budgets(records)
    return Summary(records=records, keys=identifying_keys(records), x=x, y=y,
                   budgets=[b * GB for b in sorted(set(budgets))], frontier=pareto_front(records, x, y),
                   effects=[e for axis in AXES for e in axis_effects(records, axis)])


def resolve_metric(records: list[Record], name: str) -> str:
    """`name` if some job measured it, else its `predicted_` twin if some job predicted it."""
    if any(name in r.metrics for r in records):
        return name
    twin = name[len(PREDICTED):] if name.startswith(PREDICTED) else PREDICTED + name
    return twin if any(twin in r.metrics for r in records) else name


def metric_columns(records: list[Record], extra: list[str]) -> list[str]:
    """Row metrics some job has (measured or predicted), plus the chosen axes."""
    columns: list[str] = []
    for name in [*ROW_METRICS, *extra]:
        for candidate in (name, name if name.startswith(PREDICTED) else PREDICTED + name):
            if candidate not in columns and any(candidate in r.metrics for r in records):
                columns.append(candidate)
    return columns


def config_budgets(records: list[Record]) -> list[float]:
    values = {r.config.get("budget_gb", "None") for r in records}
    return sorted(float(v) for v in values if v not in ("None", "", "null"))


# -- what the sweep varied ---------------------------------------------------------------------
# How a job was run, not what it measured: resume=true on a later run of the same sweep leaves the reused
# jobs with resume=False and the new ones with True, which is no axis of the sweep.
NOT_SWEPT = {"resume"}


def swept_keys(records: list[Record]) -> list[str]:
    """Keys whose value differs between jobs: group options (`memory`) and dotted config leaves.

    A leaf that differs only because its group's option differs (memory.every exists under ckpt,
    not under none) is implied by the option and left out.
    """
    groups = sorted({g for r in records for g in r.choices})
    varied_groups = [g for g in groups if _varies(records, lambda r, g=g: r.choices.get(g, ""))]
    leaves = sorted({k for r in records for k in r.config} - NOT_SWEPT)
    keys = list(varied_groups)
    for leaf in leaves:
        if not _varies(records, lambda r, leaf=leaf: r.config.get(leaf, "")):
            continue
        group = leaf.split(".", 1)[0]
        if group in varied_groups and not _varies_within(records, group, leaf):
            continue
        keys.append(leaf)
    return keys


def identifying_keys(records: list[Record]) -> list[str]:
    """The summary's key columns: the memory strategy always, then the other swept keys."""
    return [STRATEGY, *[k for k in swept_keys(records) if k != STRATEGY]]


def _varies(records: list[Record], get) -> bool:
    return len({get(r) for r in records}) > 1


def _varies_within(records: list[Record], group: str, leaf: str) -> bool:
    by_option: dict[str, set[str]] = {}
    for r in records:
        by_option.setdefault(r.choices.get(group, ""), set()).add(r.config.get(leaf, ""))
    return any(len(values) > 1 for values in by_option.values())


def label(record: Record, keys: list[str], skip: tuple[str, ...] = (STRATEGY,)) -> str:
    """Short text naming a job by what the sweep varied, e.g. `r=8 size=2`."""
    shown = [k for k in keys if k not in skip]
    parts = [f"{s}={record.value(k)}" for k, s in zip(shown, short_keys(shown))]
    return " ".join(parts) if parts else record.strategy or f"job {record.job}"


def short_keys(keys: list[str]) -> list[str]:
    """Each dotted key by its last part (`lora.r` -> `r`) where no other key shares that part, else in full."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if short.count(s) == 1 else k for k, s in zip(keys, short)]


# -- the answers ---------------------------------------------------------------------------------
def plotted(records: list[Record], x: str, y: str) -> list[Record]:
    """Jobs that finished ok with both axis metrics."""
    return [r for r in records if r.status == Status.OK and r.metric(x) is not None and r.metric(y) is not None]


def on_chart(records: list[Record], x: str, y: str) -> list[Record]:
    """The jobs the chart shows: points with both metrics, or, when no job has y (predictions only),
    ok jobs with x (drawn as bars)."""
    points = plotted(records, x, y)
    if points or any(r.metric(y) is not None for r in records):
        return points
    return [r for r in records if r.status == Status.OK and r.metric(x) is not None]


def pareto_front(records: list[Record], x: str, y: str) -> list[Record]:
    """Jobs no other job dominates (at most as much x and at least as much y, better in one), by increasing x."""
    front: list[Record] = []
    best = -math.inf
    for r in sorted(plotted(records, x, y), key=lambda r: (r.metric(x), -r.metric(y))):
        if r.metric(y) > best:
            front.append(r)
            best = r.metric(y)
    return front


def fastest_within(records: list[Record], budget: float, x: str, y: str) -> Record | None:
    """The job with the most y among those whose x fits the budget (bytes)."""
    fits = [r for r in plotted(records, x, y) if r.metric(x) <= budget]
    return max(fits, key=lambda r: r.metric(y)) if fits else None


def compared_axes(records: list[Record]) -> list[Axis]:
    """The axes the report compares: the memory strategy always, the others where the sweep varied them."""
    return [axis for axis in AXES if axis.group == STRATEGY or _varies(records, lambda r, a=axis: r.option(a))]


def axis_effects(records: list[Record], axis: Axis, throughput: str = "tokens_per_s",
                 peak: str = "peak_memory_bytes") -> list[Effect]:
    """Each ok job of an option other than the axis's baseline against the ok baseline job with the same
    other settings."""
    others = [k for k in swept_keys(records) if k != axis.group and not k.startswith(axis.group + ".")]
    baselines = {tuple(r.value(k) for k in others): r for r in records
                 if r.status == Status.OK and r.option(axis) == axis.baseline}
    effects = []
    for r in records:
        base = baselines.get(tuple(r.value(k) for k in others))
        if r.status != Status.OK or r.option(axis) == axis.baseline or base is None:
            continue
        pair = [r, base]  # a prediction beside a prediction in a sweep that also measured: their predicted_ twins
        speed, memory, own = (resolve_metric(pair, m) for m in (throughput, peak, axis.focus))
        effects.append(Effect(axis, r, base, _ratio(base.metric(speed), r.metric(speed)),
                              _saving(r.metric(memory), base.metric(memory)), _saving(r.metric(own), base.metric(own)),
                              (speed, memory, own)))
    return effects


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _saving(value: float | None, baseline: float | None) -> float | None:
    return 1.0 - value / baseline if value is not None and baseline else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _job_order(job: str) -> tuple[int, str]:
    return (int(job), job) if job.isdigit() else (1 << 30, job)
