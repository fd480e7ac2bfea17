"""The job's device and its libraries: which device a job runs on, what is recorded about it, quiet logs."""

from __future__ import annotations

import logging
import os
import warnings
from importlib.metadata import version

import peft
import torch
import transformers


def local_rank() -> int:
    """This process's rank on its node (0 outside a multi-device job)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(accelerator: str) -> torch.device:
    """The job's device: the GPU of this rank (LOCAL_RANK, 0 for a single-device job) when there is one."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def device_environment(device: torch.device, seed: int) -> dict[str, str]:
    env = {
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": version("lightning"),  # not imported: a prediction never imports Lightning
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


def machine_load(when: str) -> dict[str, float]:
    """The machine's 1-minute load average and the CPUs this process may run on, `when` = start or end of the
    job: a load above the CPU count means jobs and other work queued for the CPUs (timings then spread)."""
    return {f"load_1m_{when}": os.getloadavg()[0], f"cpus_{when}": float(len(os.sched_getaffinity(0)))}


def _driver_version() -> str:
    try:
        import pynvml  # optional: shipped with torch's CUDA builds as nvidia-ml-py

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        return "unknown"


def quiet_libraries() -> None:
    """Only what a job must hear from its libraries. Lightning sets its loggers to INFO when it is imported: a
    measured job calls this after importing it."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights: 100%" of every model.pretrained_path job
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
