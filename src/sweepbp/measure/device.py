"""Device figures: the CUDA caching allocator's peaks, cap and recorded history, NVML, the process's RSS. The
only code that calls torch.cuda memory functions.
"""

from __future__ import annotations

import os
import resource

import torch


def cap_device_memory(device: torch.device, budget: int | None) -> None:
    """Emulate a smaller GPU: the caching allocator refuses to grow past the budget. On CPU the exact
    tracker enforces the budget instead (MemoryTracker's `budget_bytes`)."""
    if budget is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)


def reset_device_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peaks(device: torch.device) -> dict[str, float]:
    """The CUDA caching allocator's peaks since the last reset, and NVML's view of this process."""
    if device.type != "cuda":
        return {}
    figures = {
        "peak_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
        "peak_reserved_bytes": float(torch.cuda.max_memory_reserved(device)),
    }
    nvml = _nvml_process_bytes(device)
    if nvml is not None:
        figures["nvml_process_bytes"] = float(nvml)
    return figures


def device_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def inference_allocator_figures(device: torch.device, allocated_before: int) -> dict[str, float]:
    """The allocator's view of an inference pass since `reset_device_peaks` (GPU only)."""
    if device.type != "cuda":
        return {}
    return {"inference_peak_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
            "inference_allocated_before_bytes": float(allocated_before)}


def record_memory_history(device: torch.device) -> None:
    """Start the CUDA allocator's record of every alloc and free (Python stacks only: C++ frames would cost
    seconds to symbolise at the snapshot), dropping what it recorded before."""
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", device=device,
                                             clear_history=True)


def memory_history(device: torch.device) -> dict:
    """The allocator's snapshot (its segments now and the events recorded since `record_memory_history`),
    then recording stops."""
    snapshot = torch.cuda.memory._snapshot(device)
    torch.cuda.memory._record_memory_history(enabled=None, device=device)
    return snapshot


def _nvml_process_bytes(device: torch.device) -> int | None:
    try:
        import pynvml  # shipped with torch's CUDA builds as nvidia-ml-py

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory)
    except Exception:  # NVML missing or not permitted: the figure is optional
        return None
    return None


def rss_peak_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
