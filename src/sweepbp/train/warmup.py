"""Warming the pre-importing worker: run a job's set-up code once on the `meta` device.

Importing a module is not all of its first-use cost. The first model construction, LoRA wrapping and
Trainer construction in a process fill Python-level caches (ABC subclass checks, compiled regexes,
lru_caches in transformers and peft), which otherwise costs every forked job about as much again as its
own set-up (measured in docs/performance.md). Doing it once in the fork server, on the `meta` device,
leaves those caches filled in every child and allocates no memory, runs no kernel and never touches
CUDA, so each job's measurements are exactly those of a cold process.

The fork server imports this module as a preload; importing it runs `warm()` (that is its only purpose).
"""

from __future__ import annotations

import gc
import os

ARCH_VARIABLE = "SWEEPBP_WARMUP_ARCH"  # set by worker.start_workers for the fork server's start only
TRAINER_VARIABLE = "SWEEPBP_WARMUP_TRAINER"  # "0": the sweep's jobs are predictions only (no Lightning)
TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}


def warm(arch: str, trainer: bool = True) -> None:
    """Build, adapt and checkpoint a one-layer model of `arch` on the meta device, and construct a Trainer
    (unless the jobs are predictions only, which never import Lightning)."""
    # Imported here, in the fork server: the sweep process imports this module for ARCH_VARIABLE, never torch.
    import torch

    from sweepbp.config import LoraConfig, ModelConfig
    from sweepbp.memory.checkpoint import checkpoint_layers
    from sweepbp.train.environment import quiet_libraries
    from sweepbp.train.lora import apply_lora
    from sweepbp.train.model import build_model

    quiet_libraries()
    meta = torch.device("meta")
    with meta:  # peft creates its adapter layers outside build_model: keep them on meta too
        model = apply_lora(build_model(ModelConfig(arch=arch, config=dict(TINY)), meta, seed=0), LoraConfig())
    checkpoint_layers(model, every=1)
    if not trainer:
        return
    import lightning as L

    quiet_libraries()  # after Lightning's import, which sets its loggers to INFO
    L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)


def _warm_from_environment() -> None:
    arch = os.environ.get(ARCH_VARIABLE)
    if not arch:
        return
    try:
        warm(arch, trainer=os.environ.get(TRAINER_VARIABLE) != "0")
    except Exception:  # an arch the tiny config does not fit: jobs only lose the head start
        pass
    # Everything the fork server holds now (the libraries' modules, their caches) lives as long as it
    # does: move it out of the garbage collector's generations, so a job's collections only scan what
    # the job created (a full collection over torch + transformers + lightning + mlflow costs each job
    # tenths of a second otherwise) and do not write to the shared pages.
    gc.collect()
    gc.freeze()


_warm_from_environment()
