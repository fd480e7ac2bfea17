"""The catalogue of metrics: every number a job records, with its unit, label, rank merge and place in the report.

results.json, MLflow, the summary, the charts, the rank merge of multi-device jobs and docs/metrics.md all
read this one table. Adding a metric is one `Metric` here plus the code that produces it; a test checks
that every metric a real job and a prediction produce is in the catalogue, and that docs/metrics.md shows
the table `python -m sweepbp.metrics` prints. No heavy import: the command line and the report use it.

Names carry their unit (`_bytes`, `_s`, `_per_s`, `_pct`). Two families are derived, not listed:
`predicted_<name>` (mode=predict's trace, and the prediction beside every measured run) for the metrics
marked `predicted`, and `<name>_rank<N>` (rank N of a multi-device job) for those marked `per_rank`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

PREDICTED = "predicted_"
PER_RANK = re.compile(r"^(?P<name>.+)_rank(?P<rank>\d+)$")


class Merge(Enum):
    """How the ranks of a multi-device job combine into the job's one figure."""

    SUM = "sum"  # work per second: the job does every rank's
    MAX = "max"  # memory and time: what the largest rank needs, the slowest rank takes
    RANK0 = "rank 0"  # the same on every rank, or rank 0's by convention


class Shown(Enum):
    """Where the sweep's report shows a metric."""

    TABLE = "table"  # summary.csv, summary.md and the terminal's table
    CSV = "csv"  # summary.csv only
    NO = "no"  # results.json and MLflow only


@dataclass(frozen=True)
class Metric:
    """One recorded number."""

    name: str
    unit: str  # bytes, s, tokens/s, sequences/s, count, tokens, FLOPs, %, ratio, flag (0 or 1)
    label: str  # short name for chart axes and table headers
    meaning: str  # one line: what it is (docs/metrics.md says how it is measured)
    group: str  # the section of docs/metrics.md it belongs to
    merge: Merge = Merge.RANK0
    per_rank: bool = False  # a multi-device job also records `<name>_rank<N>`
    shown: Shown = Shown.NO
    predicted: bool = False  # mode=predict records `predicted_<name>`
    gpu_only: bool = False  # recorded on CUDA devices only


# `timing_noisy`: the step times' interquartile range above this fraction of their median (a dataset's: of its
# steps' time per position, since its batches differ in size on purpose). Steps of one job do identical work,
# so on a quiet machine they spread by a few percent (benchmarks/timing_noise.py measures a job alone and
# under load); a spread this large means something else took the CPU or GPU.
NOISY_IQR_FRACTION = 0.25

MEMORY, TIME, MACHINE, MODEL, DATA, PREDICTION, FORMULA, GPU, SWEEP = (
    "memory", "time", "machine", "model", "data", "prediction", "formula", "gpu", "sweep")

CATALOGUE: tuple[Metric, ...] = (
    # -- the timed steps ----------------------------------------------------------------------------------
    Metric("tokens_per_s", "tokens/s", "tokens/s", "real (non-padding) tokens per second. Synthetic and text data, "
           "every step alike: `batch.accumulate * batch.size * batch.seq_len / step_time_s`. A dataset "
           "(data=jsonl, parquet), whose steps vary: the timed steps' real tokens over their summed time",
           TIME, Merge.SUM, per_rank=True, shown=Shown.TABLE),
    Metric("padded_tokens_per_s", "tokens/s", "padded tokens/s", "a dataset's positions computed per second, "
           "padding included: the timed steps' positions over their summed time", TIME, Merge.SUM, per_rank=True,
           shown=Shown.CSV),
    Metric("padding_fraction", "ratio", "padding", "share of the timed steps' positions that are padding "
           "(`1 - tokens_per_s / padded_tokens_per_s`; 0 when packed; data=jsonl, parquet)", TIME,
           shown=Shown.TABLE),
    Metric("samples_per_s", "sequences/s", "samples/s", "rows per second: `batch.accumulate * batch.size / "
           "step_time_s`; a dataset: the timed steps' rows over their summed time (a packed row holds several "
           "examples)", TIME, Merge.SUM, shown=Shown.CSV),
    Metric("step_time_s", "s", "step", "median wall time of the timed optimizer steps (every micro-batch's forward "
           "and backward, then the optimizer)",
           TIME, Merge.MAX, per_rank=True, shown=Shown.TABLE),
    Metric("step_time_iqr_s", "s", "step IQR", "interquartile range of the timed steps", TIME),
    Metric("step_time_min_s", "s", "fastest step", "fastest timed step", TIME),
    Metric("step_time_max_s", "s", "slowest step", "slowest timed step", TIME),
    Metric("fwd_time_s", "s", "fwd", "median forward time; the device is synchronised at each phase boundary",
           TIME, shown=Shown.TABLE),
    Metric("bwd_time_s", "s", "bwd", "median backward time", TIME, shown=Shown.TABLE),
    Metric("optim_time_s", "s", "optim", "median optimizer time (AdamW step, gradients freed)", TIME,
           shown=Shown.CSV),
    Metric("bwd_fwd_ratio", "ratio", "bwd / fwd", "`bwd_time_s / fwd_time_s`", TIME),
    Metric("timed_steps", "count", "timed steps", "how many steps the medians are over", TIME),
    Metric("timing_spread", "ratio", "timing spread", "interquartile range of the timed steps' times over their median "
           "(with a dataset, of their time per position: its batches differ in size on purpose)", TIME, Merge.MAX),
    Metric("timing_noisy", "flag", "noisy timing", f"1 when `timing_spread` exceeds {NOISY_IQR_FRACTION}: the timed "
           "steps spread too much for their median to be trusted (a busy machine); else 0", TIME, Merge.MAX,
           shown=Shown.CSV),
    Metric("train_time_s", "s", "timed", "sum of the timed steps", TIME),
    Metric("steps_time_s", "s", "all steps", "wall time inside every training step (warm-up, traced, timed)", TIME),
    Metric("setup_time_s", "s", "setup", "job start to a built, adapted model with its memory strategy "
           "(includes `batch.size=auto` and the job's own prediction)", TIME),
    Metric("job_time_s", "s", "job", "the whole job inside its process", TIME, Merge.MAX),
    Metric("snapshot_time_s", "s", "snapshot", "writing memory_snapshot.pickle and .html (snapshot=true only; "
           "recording them slows the traced step or the prediction, never the timed steps)", TIME),
    # -- the machine while the job ran ----------------------------------------------------------------------
    *(Metric(f"load_1m_{when}", "count", f"load at {when}", f"the machine's 1-minute load average (runnable "
             f"tasks) at the {when} of the job; above `cpus_{when}`, work queued for the CPUs", MACHINE, Merge.MAX)
      for when in ("start", "end")),
    *(Metric(f"cpus_{when}", "count", f"CPUs at {when}", f"CPUs the job's process could run on at its {when} "
             "(`os.sched_getaffinity`)", MACHINE) for when in ("start", "end")),
    # -- memory of the traced step (exact tracker) ---------------------------------------------------------
    Metric("peak_memory_bytes", "bytes", "peak memory", "peak of all live device tensor bytes during the traced step",
           MEMORY, Merge.MAX, per_rank=True, shown=Shown.TABLE, predicted=True),
    Metric("param_bytes", "bytes", "weights", "frozen base weights and buffers, at the peak (quantised weights at "
           "their packed size)", MEMORY, Merge.MAX,
           per_rank=True, predicted=True),
    Metric("quant_state_bytes", "bytes", "quant state", "what dequantising the quantised weights needs besides "
           "them: 4-bit absmax (and its nested quantisation) and code, int8 per-row scales (`quant` group)",
           MEMORY, Merge.MAX, per_rank=True, predicted=True),
    Metric("trainable_param_bytes", "bytes", "adapter", "trained weights, at the peak: the adapter's (LoRA, "
           "DoRA), or every weight with method=full", MEMORY, Merge.MAX, predicted=True),
    Metric("grad_bytes", "bytes", "gradients", "peak of gradient bytes (storages that landed in `param.grad`)",
           MEMORY, Merge.MAX, per_rank=True, predicted=True),
    Metric("optimizer_state_bytes", "bytes", "optimizer state", "AdamW state (`exp_avg`, `exp_avg_sq`, `step`)",
           MEMORY, Merge.MAX, per_rank=True, predicted=True),
    Metric("activation_bytes", "bytes", "activations",
           "peak of live bytes the forward (and recomputation) allocated: what autograd keeps for the backward",
           MEMORY, Merge.MAX, per_rank=True, shown=Shown.TABLE, predicted=True),
    Metric("logits_bytes", "bytes", "logits",
           "peak of live bytes the loss allocated: the output projection's logits, their fp32 copies and "
           "gradients (the loss phase of the forward and of the backward; `loss` group)",
           MEMORY, Merge.MAX, per_rank=True, shown=Shown.TABLE, predicted=True),
    Metric("other_bytes", "bytes", "other", "everything else at the peak: the batch, activation gradients, "
           "optimizer temporaries", MEMORY, Merge.MAX, predicted=True),
    Metric("host_offload_bytes", "bytes", "host (offload)", "peak of host memory an offloading strategy uses "
           "(not part of `peak_memory_bytes`)", MEMORY, predicted=True),
    Metric("inference_peak_bytes", "bytes", "inference peak", "peak of a forward pass without gradients on the "
           "same batch", MEMORY, Merge.MAX, predicted=True),
    Metric("train_inference_memory_ratio", "ratio", "train / inference", "`peak_memory_bytes / inference_peak_bytes`",
           MEMORY, predicted=True),
    Metric("rss_peak_bytes", "bytes", "peak RSS", "the job process's peak resident set size (host memory, "
           "not a tensor figure)", MEMORY, Merge.MAX, per_rank=True),
    # -- the model ----------------------------------------------------------------------------------------
    Metric("trainable_params", "count", "trainable params", "trained parameters: the adapter's, or every weight "
           "with method=full", MODEL),
    Metric("frozen_params", "count", "frozen params", "base-model parameters", MODEL),
    Metric("flops_per_token", "FLOPs", "FLOPs/token", "useful training FLOPs per token (convention below)", MODEL),
    Metric("checkpointed_layers", "count", "checkpointed layers", "decoder layers the memory strategy checkpoints",
           MODEL),
    Metric("quantized_layers", "count", "quantised linears", "linear layers with quantised weights (every one "
           "but the output head; 0 with quant=none)", MODEL),
    Metric("loss", "-", "loss", "training loss; MLflow holds every step's, results.json the last", MODEL),
    Metric("first_loss", "-", "first loss", "loss of the first step", MODEL),
    Metric("auto_batch_size", "count", "auto batch", "the batch `batch.size=auto` chose", MODEL, shown=Shown.TABLE),
    Metric("auto_batch_predictions", "count", "auto predictions", "predictions the `batch.size=auto` search made",
           MODEL),
    Metric("auto_accumulate", "count", "auto accumulation", "the `batch.accumulate` that `batch.size=auto` with "
           "`batch.effective_size` chose", MODEL),
    Metric("world_size", "count", "ranks", "processes of a multi-device job", MODEL),
    # -- a dataset's lengths (data=jsonl, parquet; train/dataset.py, train/batching.py) -------------------
    Metric("examples", "count", "examples", "non-empty examples in the dataset", DATA),
    *(Metric(f"example_tokens_{stat}", "tokens", f"{label} example", f"{what} example length in tokens, as the job "
             "tokenizes it (special tokens included), before truncation at batch.seq_len", DATA)
      for stat, label, what in (("mean", "mean", "mean"), ("p50", "median", "median"),
                                ("p95", "p95", "95th percentile (inclusive quantiles)"), ("max", "longest", "longest"))),
    Metric("examples_over_seq_len", "count", "over seq_len", "examples longer than batch.seq_len: truncated when "
           "padded, split over rows when packed", DATA),
    Metric("epoch_steps", "count", "epoch steps", "optimizer steps in one pass over the dataset at this batch "
           "shape (the traced step is the worst of them)", DATA),
    Metric("worst_batch_tokens", "tokens", "worst batch tokens", "real tokens of the traced step: the epoch's "
           "worst step (the most positions in a micro-batch)", DATA),
    Metric("worst_batch_seq_len", "tokens", "worst batch length", "positions per row of the traced step's widest "
           "micro-batch (its longest row, or batch.seq_len)", DATA),
    # -- the prediction -----------------------------------------------------------------------------------
    Metric("predict_time_s", "s", "predict", "wall time of the prediction itself", PREDICTION),
    Metric("predicted_error_pct", "%", "prediction error", "`(predicted - measured) / measured` of "
           "`peak_memory_bytes`", PREDICTION),
    Metric("predicted_inference_error_pct", "%", "inference prediction error", "the same for "
           "`inference_peak_bytes`", PREDICTION),
    Metric("predicted_allocator_error_pct", "%", "allocator prediction error", "the same against "
           "`peak_allocated_bytes`", PREDICTION, gpu_only=True),
    # -- the closed-form cross-check (memory=none and ckpt only) --------------------------------------------
    *(Metric(f"formula_{name}", "bytes", f"formula {label}", f"closed-form estimate of {what}", FORMULA)
      for name, label, what in (
          ("param_bytes", "weights", "the weights"),
          ("trainable_param_bytes", "adapter", "the adapter (LoRA)"),
          ("optimizer_state_bytes", "optimizer state", "AdamW's state"),
          ("activation_bytes", "activations", "the activations the decoder layers save"),
          ("logits_bytes", "logits", "the loss transient at its peak (per `loss` option)"),
          ("peak_memory_bytes", "peak memory", "the peak"),
          ("inference_peak_bytes", "inference peak", "the inference peak"))),
    # -- CUDA only ----------------------------------------------------------------------------------------
    Metric("peak_allocated_bytes", "bytes", "allocator peak", "`torch.cuda.max_memory_allocated` over the traced "
           "step", GPU, Merge.MAX, per_rank=True, gpu_only=True),
    Metric("peak_reserved_bytes", "bytes", "reserved peak", "`torch.cuda.max_memory_reserved` over the traced step",
           GPU, Merge.MAX, per_rank=True, gpu_only=True),
    Metric("nvml_process_bytes", "bytes", "NVML", "NVML's figure for the job process (includes the CUDA context)",
           GPU, Merge.MAX, gpu_only=True),
    Metric("inference_peak_allocated_bytes", "bytes", "inference allocator peak", "`max_memory_allocated` over the "
           "inference pass", GPU, gpu_only=True),
    Metric("inference_allocated_before_bytes", "bytes", "allocated before inference", "`memory_allocated` before "
           "the inference pass", GPU, gpu_only=True),
    Metric("tracker_vs_allocated_pct", "%", "tracker vs allocator", "`(peak_memory_bytes - peak_allocated_bytes) / "
           "peak_allocated_bytes`", GPU, gpu_only=True),
    Metric("mfu", "ratio", "MFU", "model FLOPs utilisation: `tokens_per_s * flops_per_token / peak FLOP/s`", GPU,
           gpu_only=True),
    # -- a sweep's answer, on its parent run (report/headline.py) -------------------------------------------
    Metric("jobs_total", "count", "jobs", "jobs of the sweep, reused ones (resume=true) included", SWEEP),
    Metric("jobs_ok", "count", "jobs ok", "jobs that finished `ok`", SWEEP),
    Metric("jobs_oom", "count", "jobs oom", "jobs that ran out of memory (`oom`)", SWEEP),
    Metric("best_tokens_per_s", "tokens/s", "best tokens/s", "the highest `tokens_per_s` of an ok job", SWEEP),
    Metric("lowest_peak_memory_bytes", "bytes", "lowest peak", "the lowest `peak_memory_bytes` of an ok job", SWEEP),
    Metric("lowest_predicted_peak_memory_bytes", "bytes", "lowest predicted peak", "the lowest "
           "`predicted_peak_memory_bytes` of an ok job (a sweep of predictions)", SWEEP),
    Metric("budget_gb", "GB", "budget", "a memory budget of the sweep (`budget_gb`; one step per budget, smallest "
           "first, for this and the budget_ figures below)", SWEEP),
    Metric("budget_jobs_fit", "count", "jobs that fit", "ok jobs whose (predicted) peak fits the budget", SWEEP),
    Metric("budget_best_tokens_per_s", "tokens/s", "fastest within budget", "`tokens_per_s` of the fastest job "
           "that fits the budget", SWEEP),
    Metric("budget_best_peak_memory_bytes", "bytes", "its peak", "`peak_memory_bytes` of that job", SWEEP),
)

METRICS: dict[str, Metric] = {m.name: m for m in CATALOGUE}
GROUP_TITLES = {MEMORY: "Memory of the traced step", TIME: "Time of the timed steps",
                MACHINE: "The machine while the job ran", MODEL: "The model and the run",
                DATA: "The data (data=jsonl, parquet)", PREDICTION: "The prediction",
                FORMULA: "The closed-form cross-check", GPU: "CUDA only", SWEEP: "The sweep (its parent run)"}


def metric(name: str) -> Metric:
    """The catalogue entry of a recorded name, derived names included (`predicted_...`, `..._rank1`).
    Raises KeyError for a name the catalogue does not know."""
    if name in METRICS:
        return METRICS[name]
    ranked = PER_RANK.match(name)
    if ranked and METRICS.get(ranked["name"], None) is not None and METRICS[ranked["name"]].per_rank:
        return METRICS[ranked["name"]]
    if name.startswith(PREDICTED) and METRICS.get(name[len(PREDICTED):]) is not None:
        base = METRICS[name[len(PREDICTED):]]
        if base.predicted:
            return base
    raise KeyError(name)


def known(name: str) -> bool:
    try:
        metric(name)
    except KeyError:
        return False
    return True


def label(name: str) -> str:
    """The short label of a metric (`predicted peak memory` for `predicted_peak_memory_bytes`); the name
    itself for one the catalogue does not know."""
    try:
        entry = metric(name)
    except KeyError:
        return name
    if name.startswith(PREDICTED) and name not in METRICS:
        return f"predicted {entry.label}"
    return entry.label


def unit(name: str) -> str:
    """The unit of a metric ('' for a name the catalogue does not know)."""
    try:
        return metric(name).unit
    except KeyError:
        return ""


def shown(where: Shown) -> tuple[str, ...]:
    """Names of the metrics the report shows there (TABLE metrics are in the CSV too)."""
    wanted = (Shown.TABLE,) if where == Shown.TABLE else (Shown.TABLE, Shown.CSV)
    return tuple(m.name for m in CATALOGUE if m.shown in wanted)


def merged_by(merge: Merge) -> tuple[str, ...]:
    return tuple(m.name for m in CATALOGUE if m.merge == merge)


def per_rank() -> tuple[str, ...]:
    return tuple(m.name for m in CATALOGUE if m.per_rank)


def markdown() -> str:
    """The catalogue as the Markdown tables of docs/metrics.md, one per group."""
    out: list[str] = []
    for group, title in GROUP_TITLES.items():
        out += [f"### {title}", "", "| metric | unit | ranks | report | meaning |", "|---|---|---|---|---|"]
        for m in (m for m in CATALOGUE if m.group == group):
            names = f"`{m.name}`" + (f", `{PREDICTED}{m.name}`" if m.predicted else "")
            ranks = m.merge.value + (", per rank" if m.per_rank else "")
            meaning = m.meaning + (" (GPU only)" if m.gpu_only and m.group != GPU else "")
            out.append(f"| {names} | {m.unit} | {ranks} | {m.shown.value} | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
