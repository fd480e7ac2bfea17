"""The job side of a multi-device job: this rank's number, its share of threads and data, Lightning's strategy.

The ranks are started by the sweep (sweepbp.sweep.ranks); Lightning sees LOCAL_RANK, treats the processes
as created externally, and only joins them into a process group.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from transformers.modeling_layers import GradientCheckpointingLayer

from sweepbp.config import RunConfig
from sweepbp.train.environment import local_rank


def data_seed(seed: int) -> int:
    """Each rank trains on its own batches (data parallel); rank 0 sees what a single-device job sees."""
    return seed + 1000 * local_rank()


def setup_rank() -> None:
    """In a rank's process, before the job: the ranks share the host's cores, so each gets its share
    of threads instead of all of them (oversubscribed cores would slow every rank down)."""
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def trainer_arguments(run: RunConfig, device_type: str) -> dict:
    """Lightning Trainer arguments for the job's strategy (single device: Lightning's defaults)."""
    if run.cfg.world_size == 1:
        return {"strategy": "auto"}
    # Lightning only where a Trainer is made: a prediction imports this module (local_rank), never Lightning
    from lightning.pytorch.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    strategy = run.cfg.strategy
    if strategy.name == "fsdp":
        # use_orig_params: LoRA mixes frozen and trainable parameters in one wrapped module.
        chosen = FSDPStrategy(sharding_strategy=strategy.sharding_strategy, use_orig_params=True,
                              auto_wrap_policy=_decoder_layer_classes())
    else:
        chosen = DDPStrategy(process_group_backend="nccl" if device_type == "cuda" else "gloo")
    # LightningEnvironment explicitly: under SLURM, Lightning would otherwise take SLURM's task count as
    # the world size; the ranks here are sweepbp's own processes.
    return {"strategy": chosen, "plugins": [LightningEnvironment()], "use_distributed_sampler": False}


def _decoder_layer_classes() -> set[type]:
    return {GradientCheckpointingLayer}


def process_group_record() -> dict[str, str]:
    """The process group a rank trained in (empty for a single-device job): proof the ranks were joined."""
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    return {"process_group_backend": str(dist.get_backend()), "process_group_size": str(dist.get_world_size()),
            "rank": str(dist.get_rank())}
