"""The recipe of one job: predict -> build -> adapt -> apply memory strategy -> fit -> measure -> result.

Runs inside the job's own process (sweepbp.sweep.worker forks it), so nothing it allocates outlives it.
mode=predict takes the same path on tensors without data (sweepbp.predict) and records the prediction.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from sweepbp.config import DATASETS, LossConfig, RunConfig
from sweepbp.measure.device import (
    cap_device_memory,
    device_allocated,
    inference_allocator_figures,
    reset_device_peaks,
    rss_peak_bytes,
)
from sweepbp.measure.snapshot import write_snapshot
from sweepbp.measure.stats import TimingSummary, varied_throughput
from sweepbp.measure.tracker import timeline_samples
from sweepbp.memory import apply_memory_strategy, assert_training_mode
from sweepbp.predict.autobatch import resolve_batch_size
from sweepbp.predict.record import add_prediction, prediction_errors, record_prediction
from sweepbp.predict.trace import predict, target_device
from sweepbp.result import JobResult, Status, host_environment, one_line
from sweepbp.train.data import token_batches
from sweepbp.train.distributed import data_seed, local_rank, process_group_record, trainer_arguments
from sweepbp.train.environment import device_environment, machine_load, pick_device, quiet_libraries
from sweepbp.train.flops import peak_flops
from sweepbp.train.lora import adapted_layer_names, apply_method
from sweepbp.train.model import build_model, parameter_counts
from sweepbp.train.step import Diverged, inference_peak
from sweepbp.train.quant import quantize_model


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM reached the job (a BaseException, so no `except Exception` swallows it and
    Lightning re-raises it instead of turning it into sys.exit(1))."""


def run_job(run: RunConfig, progress=None, output_dir: Path | None = None) -> JobResult:
    """Run one job to a result; every expected failure becomes a status, never an exception. `output_dir` is
    the job's folder, where it writes its memory snapshot (snapshot=true)."""
    result = JobResult.of(run, Status.RUNNING, environment=host_environment(), metrics=machine_load("start"))
    start = time.perf_counter()
    try:
        quiet_libraries()
        if run.cfg.snapshot and output_dir is None:
            raise ValueError("snapshot=true needs the job's folder (run_job's output_dir)")
        if run.cfg.mode == "predict":
            predict_job(run, result, output_dir)
        else:
            measure_job(run, result, progress, start, output_dir)
        result.status = Status.OK
    except torch.OutOfMemoryError as err:
        result.status, result.error = Status.OOM, one_line(err)
    except (Interrupted, KeyboardInterrupt):
        result.status, result.error = Status.KILLED, "interrupted (Ctrl-C or SIGTERM)"
    except Diverged as err:
        result.status, result.error = Status.DIVERGED, one_line(err)
    except Exception as err:
        result.status, result.error = Status.FAILED, one_line(err)
        result.environment["traceback"] = traceback.format_exc()
    result.metrics["job_time_s"] = time.perf_counter() - start
    result.metrics.update(machine_load("end"))
    return result


def measure_job(run: RunConfig, result: JobResult, progress, start: float, output_dir: Path | None = None) -> None:
    """mode=measure: predict, build, adapt, apply the memory strategy, fit; the measurements go into `result`."""
    # Lightning only in a measured job (the fork server of a sweep with measured jobs has it imported already): a
    # prediction never imports it, about 1.2-1.9 s of a fresh process's start on a 2-core machine
    import lightning as L

    from sweepbp.train.module import LoraFinetune

    quiet_libraries()  # again: Lightning's import sets its loggers to INFO
    device = pick_device(run.cfg.trainer.accelerator)
    result.environment.update(device_environment(device, run.cfg.trainer.seed))
    run = resolve_batch_size(run, device.type, result.metrics)  # batch.size=auto
    cfg = run.cfg
    if progress is not None and "auto_batch_size" in result.metrics:
        progress.say(f"batch.size=auto chose {cfg.batch.size}" + (
            f" x {cfg.batch.accumulate} accumulated" if cfg.batch.accumulate > 1 else "") +
            f", the largest predicted to fit budget_gb={cfg.budget_gb:g} on {device.type}")
    add_prediction(cfg, device.type, result)  # before the real model exists: it costs no device memory
    cap_device_memory(device, cfg.budget_bytes)
    base = build_model(cfg.model, device, cfg.trainer.seed)
    result.metrics["quantized_layers"] = float(quantize_model(base, cfg.quant, device))
    model = apply_method(base, cfg.method, cfg.lora)
    result.environment["lora_resolved_targets"] = ",".join(adapted_layer_names(model))
    applied = apply_memory_strategy(model, cfg.memory, device)
    model.train()
    assert_training_mode(model)
    batches = token_batches(cfg, model.config.vocab_size, data_seed(cfg.trainer.seed))
    result.metrics.update(batches.metrics())
    result.metrics.update(parameter_counts(model, cfg.batch.seq_len))
    result.metrics["checkpointed_layers"] = applied.checkpointed_layers
    result.metrics["setup_time_s"] = time.perf_counter() - start
    result.metrics.update(measure_inference(model, batches.inference_batch(), cfg.loss, device, cfg.budget_bytes))

    module = LoraFinetune(model, applied, cfg.loss, cfg.optim, cfg.trainer.lr, cfg.trainer.weight_decay, cfg.trainer.warmup_steps,
                          cfg.budget_bytes, on_step=progress, snapshot=cfg.snapshot)
    trainer = L.Trainer(max_steps=cfg.trainer.steps, accelerator="gpu" if device.type == "cuda" else "cpu",
                        devices=cfg.trainer.devices, precision=cfg.trainer.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=None, **trainer_arguments(run, device.type))
    try:
        trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    finally:
        result.losses = list(module.losses)
        _collect(module, cfg, device, result)
        save_snapshot(module.snapshot_data, output_dir, result)  # also the one up to an out-of-memory error
    result.environment.update(process_group_record())
    if trainer.interrupted:
        raise Interrupted()


def predict_job(run: RunConfig, result: JobResult, output_dir: Path | None = None) -> None:
    """mode=predict: the job's record is its prediction. Over `budget_gb` it is an `oom` result (with
    every predicted figure kept), as the real job would be."""
    device = target_device(run.cfg.trainer.accelerator)
    result.environment.update(device_environment(torch.device("cpu"), run.cfg.trainer.seed))
    result.environment["predicted_device"] = device
    run = resolve_batch_size(run, device, result.metrics)
    prediction = predict(run.cfg, device, keep_timeline=True, snapshot=run.cfg.snapshot)
    record_prediction(run.cfg, prediction, result)
    result.metrics.update(prediction.parameters)
    result.metrics.update(prediction.data)
    result.metrics["checkpointed_layers"] = float(prediction.checkpointed_layers)
    result.metrics["quantized_layers"] = float(prediction.quantized_layers)
    result.environment["lora_resolved_targets"] = ",".join(prediction.adapted_layers)
    result.timeline = timeline_samples(prediction.report)
    save_snapshot(prediction.snapshot, output_dir, result)
    if not prediction.fits(run.cfg.budget_bytes):
        raise torch.OutOfMemoryError(f"predicted peak {prediction.peak_bytes:,} bytes exceeds "
                                     f"budget_gb={run.cfg.budget_gb:g} on {device}")


def save_snapshot(snapshot: dict | None, folder: Path | None, result: JobResult) -> None:
    """memory_snapshot.pickle and .html into the job's folder (rank 0's, in a multi-device job), named in the
    result so the sweep logs them with the run; `snapshot_time_s` is what writing them took."""
    if snapshot is None or folder is None or local_rank() != 0:
        return
    started = time.perf_counter()
    result.artifacts += [path.name for path in write_snapshot(snapshot, folder)]
    result.metrics["snapshot_time_s"] = time.perf_counter() - started


def _collect(module, cfg, device: torch.device, result: JobResult) -> None:
    """Whatever was measured so far goes into the result, also when the fit stopped early."""
    if module.trace is not None:
        result.metrics.update(module.trace.metrics())
        result.timeline = timeline_samples(module.trace)
    if module.timers:
        timing = TimingSummary([t.total for t in module.timers], [t.phases["forward"] for t in module.timers],
                               [t.phases["backward"] for t in module.timers], [t.phases["optim"] for t in module.timers])
        sequences = int(cfg.batch.size) * cfg.batch.accumulate  # every micro-batch of the optimizer step
        result.metrics.update(timing.metrics(sequences * cfg.batch.seq_len, sequences))
        if cfg.data.name in DATASETS:  # batches of varied size: real tokens over the timed steps' summed time
            result.metrics.update(varied_throughput(timing.step_times, module.timed_counts))
        _add_mfu(result, device)
    if module.losses:
        result.metrics["steps_time_s"] = module.steps_time_s
        result.metrics["loss"] = module.losses[-1]
        result.metrics["first_loss"] = module.losses[0]
    if "peak_memory_bytes" in result.metrics and result.metrics.get("inference_peak_bytes"):
        result.metrics["train_inference_memory_ratio"] = (
            result.metrics["peak_memory_bytes"] / result.metrics["inference_peak_bytes"])
    result.metrics.update(module.allocator_figures)
    allocated = module.allocator_figures.get("peak_allocated_bytes")
    if allocated and "peak_memory_bytes" in result.metrics:
        # How far the exact tracker is from the CUDA allocator on the same traced step (GPU only).
        result.metrics["tracker_vs_allocated_pct"] = 100.0 * (result.metrics["peak_memory_bytes"] - allocated) / allocated
    result.metrics["rss_peak_bytes"] = rss_peak_bytes()
    result.metrics.update(prediction_errors(result.metrics))


def measure_inference(model: torch.nn.Module, batch: dict, loss: LossConfig, device: torch.device,
                      budget: int | None) -> dict[str, float]:
    """Peak of a forward pass and its loss without gradients on the same batch: weights + adapter + transients."""
    batch = {k: v.to(device) for k, v in batch.items()}
    reset_device_peaks(device)
    before = device_allocated(device)
    figures = {"inference_peak_bytes": float(inference_peak(model, batch, loss, device.type, budget))}
    figures.update(inference_allocator_figures(device, before))
    return figures


def _add_mfu(result: JobResult, device: torch.device) -> None:
    if device.type != "cuda":
        return
    peak = peak_flops(result.environment.get("device_name", ""))
    if peak:
        result.metrics["mfu"] = result.metrics["tokens_per_s"] * result.metrics["flops_per_token"] / peak
