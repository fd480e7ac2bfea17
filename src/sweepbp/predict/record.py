"""A prediction in a job's record: the predicted_* metrics, the closed-form estimate beside them, the kernels
chosen for the target, and (in a measured job) how far the prediction is from the measurement."""

from __future__ import annotations

from sweepbp.config import SweepbpConfig
from sweepbp.metrics import PREDICTED
from sweepbp.predict.estimate import estimate
from sweepbp.predict.trace import Prediction, predict
from sweepbp.result import JobResult, one_line
from sweepbp.train.model import hf_config


def add_prediction(cfg: SweepbpConfig, device: str, result: JobResult) -> None:
    """mode=measure: log the job's prediction beside its measurement. A prediction that fails is noted
    in the environment and never fails the measured job."""
    result.environment["predicted_device"] = device
    try:
        record_prediction(cfg, predict(cfg, device), result)
    except Exception as err:  # the measurement is what the job is for
        result.environment["prediction_error"] = one_line(err)


def prediction_errors(metrics: dict[str, float]) -> dict[str, float]:
    """Signed relative errors of the prediction, in percent: (predicted - measured) / measured * 100.

    `predicted_error_pct` compares with the exact tracker's `peak_memory_bytes`; on CUDA
    `predicted_allocator_error_pct` compares with `torch.cuda.max_memory_allocated` (`peak_allocated_bytes`).
    """
    predicted = metrics.get(f"{PREDICTED}peak_memory_bytes")
    errors: dict[str, float] = {}
    if predicted is None:
        return errors
    for name, measured in (("predicted_error_pct", "peak_memory_bytes"),
                           ("predicted_allocator_error_pct", "peak_allocated_bytes"),
                           ("predicted_inference_error_pct", "inference_peak_bytes")):
        truth = metrics.get(measured)
        guess = predicted if measured != "inference_peak_bytes" else metrics.get(f"{PREDICTED}inference_peak_bytes")
        if truth and guess is not None:
            errors[name] = 100.0 * (guess - truth) / truth
    return errors


def record_prediction(cfg: SweepbpConfig, prediction: Prediction, result: JobResult) -> None:
    result.metrics.update(prediction.metrics())
    formula = estimate(cfg, hf_config(cfg.model), prediction.batch_size, prediction.adapted_layers)
    if formula is not None:
        result.metrics.update(formula.metrics())
    if prediction.modelled:
        result.environment["predicted_kernels"] = "; ".join(prediction.modelled)
    result.environment.update(prediction.record())
