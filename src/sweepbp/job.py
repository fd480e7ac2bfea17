"""The recipe of one job: build -> adapt -> apply memory strategy -> fit -> measure -> result.

Runs inside the job's own process (see worker.py), so nothing it allocates outlives it.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from dataclasses import asdict

import torch

from sweepbp.config import RunConfig, config_as_dict
from sweepbp.result import JobResult, host_environment

GB = 1e9


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM reached the job (a BaseException, so no `except Exception` swallows it and
    Lightning re-raises it instead of turning it into sys.exit(1))."""


def pick_device(accelerator: str) -> torch.device:
    """The job's device: the GPU of this rank (LOCAL_RANK, 0 for a single-device job) when there is one."""
    from sweepbp.sweep.ranks import local_rank

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def run_job(run: RunConfig, progress=None) -> JobResult:
    """Run one job to a result; every expected failure becomes a status, never an exception."""
    cfg = run.cfg
    result = JobResult(status="running", mode=cfg.mode, config=config_as_dict(cfg), choices=run.choices,
                       environment=host_environment())
    start = time.perf_counter()
    try:
        _quiet_libraries()
        if cfg.mode == "predict":
            from sweepbp.predict.trace import predict_job

            result.environment.update(device_environment(torch.device("cpu"), cfg.trainer.seed))
            predict_job(run, result)
        else:
            device = pick_device(cfg.trainer.accelerator)
            result.environment.update(device_environment(device, cfg.trainer.seed))
            _fit_and_measure(run, device, result, progress, start)
        result.status = "ok"
    except torch.OutOfMemoryError as err:
        result.status, result.error = "oom", _one_line(err)
    except (Interrupted, KeyboardInterrupt):
        result.status, result.error = "killed", "interrupted (Ctrl-C or SIGTERM)"
    except Exception as err:
        from sweepbp.train.module import Diverged

        if isinstance(err, Diverged):
            result.status, result.error = "diverged", _one_line(err)
        else:
            result.status, result.error = "failed", _one_line(err)
            result.environment["traceback"] = traceback.format_exc()
    result.metrics["job_time_s"] = time.perf_counter() - start
    return result


def _fit_and_measure(run: RunConfig, device: torch.device, result: JobResult, progress, start: float) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from sweepbp.train.data import TokenBatches
    from sweepbp.sweep.ranks import data_seed, process_group_record, trainer_arguments
    from sweepbp.train.lora import apply_lora
    from sweepbp.memory import apply_memory_strategy, assert_training_mode
    from sweepbp.predict.autobatch import resolve_batch_size
    from sweepbp.train.model import build_model
    from sweepbp.train.module import LoraFinetune
    from sweepbp.predict.trace import add_prediction

    run = resolve_batch_size(run, device.type, result.metrics)  # batch.size=auto
    cfg = run.cfg
    add_prediction(cfg, device.type, result)  # before the real model exists: it costs no device memory
    budget = int(cfg.budget_gb * GB) if cfg.budget_gb is not None else None
    if budget is not None and device.type == "cuda":
        cap_device_memory(device, budget)
    model = apply_lora(build_model(cfg.model, device, cfg.trainer.seed), cfg.lora)
    applied = apply_memory_strategy(model, cfg.memory, device)
    model.train()
    assert_training_mode(model)
    batches = TokenBatches(cfg.data, cfg.trainer.steps, int(cfg.batch.size), cfg.batch.seq_len,
                           model.config.vocab_size, data_seed(cfg.trainer.seed))
    result.metrics.update(parameter_counts(model, cfg.batch.seq_len))
    result.metrics["checkpointed_layers"] = applied.checkpointed_layers
    result.metrics["setup_time_s"] = time.perf_counter() - start
    result.metrics.update(measure_inference(model, batches[0], device, budget))

    module = LoraFinetune(model, applied, cfg.trainer.lr, cfg.trainer.weight_decay, cfg.trainer.warmup_steps,
                          budget, on_step=progress)
    trainer = L.Trainer(max_steps=cfg.trainer.steps, accelerator="gpu" if device.type == "cuda" else "cpu",
                        devices=cfg.trainer.devices, precision=cfg.trainer.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=None, **trainer_arguments(run, device.type))
    try:
        trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    finally:
        result.losses = list(module.losses)
        _collect(module, cfg, device, result)
    result.environment.update(process_group_record())
    if trainer.interrupted:
        raise Interrupted()


def _collect(module, cfg, device: torch.device, result: JobResult) -> None:
    """Whatever was measured so far goes into the result, also when the fit stopped early."""
    from sweepbp.measure.tracker import TimingSummary, rss_peak_bytes
    from sweepbp.predict.trace import prediction_errors

    if module.trace is not None:
        result.metrics.update(module.trace.metrics())
        result.timeline = [asdict(s) for s in module.trace.timeline[:: max(1, len(module.trace.timeline) // 2000)]]
    if module.timers:
        timing = TimingSummary([t.total for t in module.timers], [t.phases["forward"] for t in module.timers],
                               [t.phases["backward"] for t in module.timers], [t.phases["optim"] for t in module.timers])
        tokens = int(cfg.batch.size) * cfg.batch.seq_len
        result.metrics.update(timing.metrics(tokens, int(cfg.batch.size)))
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


def measure_inference(model: torch.nn.Module, batch: dict, device: torch.device, budget: int | None) -> dict[str, float]:
    """Peak of a forward pass without gradients on the same batch: weights + adapter + transients."""
    from sweepbp.measure.tracker import MemoryTracker, device_allocated, reset_device_peaks
    from sweepbp.train.module import register_state

    batch = {k: v.to(device) for k, v in batch.items()}
    tracker = MemoryTracker(device.type, budget)
    register_state(tracker, model, None, batch)
    reset_device_peaks(device)
    before = device_allocated(device)
    with torch.no_grad(), tracker, tracker.phase_of("inference"):
        model(**batch)
    figures = {"inference_peak_bytes": float(tracker.report().peak_bytes)}
    if device.type == "cuda":
        figures["inference_peak_allocated_bytes"] = float(torch.cuda.max_memory_allocated(device))
        figures["inference_allocated_before_bytes"] = float(before)
    return figures


def parameter_counts(model: torch.nn.Module, seq_len: int) -> dict[str, float]:
    from sweepbp.train.flops import lora_flops_per_token

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.get_input_embeddings().weight.numel()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    config = model.config
    flops = lora_flops_per_token(frozen - embedding, trainable, config.num_hidden_layers, seq_len, config.hidden_size)
    return {"trainable_params": float(trainable), "frozen_params": float(frozen), "flops_per_token": flops}


def _add_mfu(result: JobResult, device: torch.device) -> None:
    from sweepbp.train.flops import peak_flops

    if device.type != "cuda":
        return
    peak = peak_flops(result.environment.get("device_name", ""))
    if peak:
        result.metrics["mfu"] = result.metrics["tokens_per_s"] * result.metrics["flops_per_token"] / peak


def cap_device_memory(device: torch.device, budget: int) -> None:
    """Emulate a smaller GPU: the caching allocator refuses to grow past the budget."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)


def device_environment(device: torch.device, seed: int) -> dict[str, str]:
    import lightning
    import peft
    import transformers

    env = {
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "seed": str(seed),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"device_name": props.name, "device_total_memory_bytes": str(props.total_memory),
                    "cuda": str(torch.version.cuda), "driver": _driver_version()})
    else:
        env["device_name"] = "cpu"
    return env


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        return "unknown"


def _quiet_libraries() -> None:
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: quieten after it)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
