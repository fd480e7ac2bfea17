"""Validation of a composed config: every problem as one line naming the key, the value and what is allowed.

`to_run_config` turns a composed DictConfig into a `RunConfig` and validates it without importing torch,
transformers or mlflow, so bad input fails in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweepbp.config.model_source import (
    config_file_problems,
    expert_problems,
    pretrained_problems,
    shape_problems,
    with_file_shape,
)
from sweepbp.config.schema import (
    ACCELERATORS,
    ADAPTER_DTYPES,
    ALL_LINEAR,
    BYTE_VOCAB,
    ARCH_LINEAR_MODULES,
    ATTENTION,
    DATA_ORDERS,
    DTYPES,
    FUSED_LOSSES,
    GROUPS,
    HEAD_RESCALING_FIELDS,
    MODES,
    NAMED_SCHEMAS,
    PAD_TO,
    PRECISIONS,
    SELECTIVE_POLICIES,
    ConfigError,
    DataConfig,
    DatasetConfig,
    MemoryConfig,
    RunConfig,
    StrategyConfig,
    SweepbpConfig,
    TrainerConfig,
)
from sweepbp.datafile import dataset_problems


def to_run_config(cfg: DictConfig, choices: dict[str, str]) -> RunConfig:
    """Convert a composed config to typed objects and validate it; raise ConfigError listing all problems."""
    try:
        typed = OmegaConf.to_object(cfg)
    except Exception as err:  # OmegaConf's own type errors (missing values, bad types)
        raise ConfigError([_omegaconf_message(err)]) from None
    assert isinstance(typed, SweepbpConfig)
    typed.model = with_file_shape(typed.model)
    problems = validate(typed)
    if problems:
        raise ConfigError(problems)
    return RunConfig(cfg=typed, choices={g: choices.get(g, "") for g in GROUPS})


def _omegaconf_message(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def validate(cfg: SweepbpConfig) -> list[str]:
    """Every problem of a config, each as one line naming the key, the value and what is allowed."""
    problems: list[str] = []

    def need(ok: bool, key: str, value: object, allowed: str) -> None:
        if not ok:
            problems.append(f"{key} must be {allowed}, got {value!r}")

    m, lo, b, t = cfg.model, cfg.lora, cfg.batch, cfg.trainer
    need(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {', '.join(DTYPES)}")
    need(m.attn_implementation in ATTENTION, "model.attn_implementation", m.attn_implementation,
         f"one of {', '.join(ATTENTION)}")
    if m.pretrained_path is not None:
        problems.extend(pretrained_problems(m.pretrained_path))
        if m.config_path is not None:
            problems.append(f"model.config_path must be null with model.pretrained_path (its config.json is the "
                            f"shape), got {m.config_path!r}")
    elif m.config_path is not None:
        problems.extend(config_file_problems(m.config_path))
    elif not m.config:
        problems.append("model.config must hold the HF config fields of a random-init model, got {}")
    else:
        problems.extend(shape_problems(m.config))
    if not problems:
        problems.extend(expert_problems(m, cfg.mode))
    need(lo.r > 0, "lora.r", lo.r, "a positive integer")
    need(lo.alpha > 0, "lora.alpha", lo.alpha, "a positive number")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", lo.dropout, "in [0, 1)")
    need(len(lo.target_modules) > 0, "lora.target_modules", lo.target_modules, "a non-empty list")
    need(lo.adapter_dtype in ADAPTER_DTYPES, "lora.adapter_dtype", lo.adapter_dtype, " or ".join(ADAPTER_DTYPES))
    known = ARCH_LINEAR_MODULES.get(m.arch) if m.pretrained_path is None and m.config_path is None else None
    if known is not None and lo.target_modules != [ALL_LINEAR] and cfg.method.name != "full":
        unknown = [x for x in lo.target_modules if x not in known]
        need(not unknown, "lora.target_modules", unknown,
             f"{ALL_LINEAR} or names of {m.arch}'s linear layers ({', '.join(known)})")
    need(ALL_LINEAR not in lo.target_modules or lo.target_modules == [ALL_LINEAR], "lora.target_modules",
         lo.target_modules, f"[{ALL_LINEAR}] alone or a list of layer names")
    if (m.arch == "gemma2" and m.config_path is None and m.attn_implementation == "sdpa"
            and m.config.get("attn_logit_softcapping", 50.0)):
        problems.append("model.attn_implementation must be eager for gemma2 with attention soft-capping "
                        "(model.config.attn_logit_softcapping), got 'sdpa' (sdpa cannot soft-cap the scores)")
    need(_positive_int_or_auto(b.size), "batch.size", b.size, "a positive integer or 'auto'")
    if b.size == "auto":
        need(cfg.budget_gb is not None, "batch.size", b.size, "an integer unless budget_gb is set ('auto' needs a budget)")
    need(b.seq_len > 0, "batch.seq_len", b.seq_len, "a positive integer")
    need(b.accumulate >= 1, "batch.accumulate", b.accumulate, "a positive integer (1 = no accumulation)")
    if b.effective_size is not None:
        need(b.effective_size >= 1, "batch.effective_size", b.effective_size, "a positive integer or null")
        need(b.size == "auto", "batch.effective_size", b.effective_size,
             "null unless batch.size=auto (set batch.accumulate for a fixed micro-batch)")
        need(b.accumulate == 1, "batch.accumulate", b.accumulate, "1 with batch.effective_size (auto chooses it)")
    max_pos = m.config.get("max_position_embeddings") if m.pretrained_path is None and m.config_path is None else None
    if isinstance(max_pos, int) and b.seq_len > 0:
        need(b.seq_len <= max_pos, "batch.seq_len", b.seq_len, f"at most model.config.max_position_embeddings={max_pos}")
    need(t.steps > 0, "trainer.steps", t.steps, "a positive integer")
    need(t.warmup_steps >= 1, "trainer.warmup_steps", t.warmup_steps,
         "at least 1 (the first step allocates optimizer state and is never timed)")
    if t.steps > 0 and t.warmup_steps >= 1:
        need(t.warmup_steps + 1 < t.steps, "trainer.warmup_steps", t.warmup_steps,
             f"below trainer.steps - 1 = {t.steps - 1} (one traced step and at least one timed step follow)")
    need(t.lr > 0, "trainer.lr", t.lr, "a positive number")
    need(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "zero or positive")
    need(t.precision in PRECISIONS, "trainer.precision", t.precision, f"one of {', '.join(PRECISIONS)}")
    need(t.accelerator in ACCELERATORS, "trainer.accelerator", t.accelerator, f"one of {', '.join(ACCELERATORS)}")
    need(t.devices >= 1, "trainer.devices", t.devices, "a positive integer")
    problems.extend(_option_problems(cfg))
    problems.extend(_memory_problems(cfg.memory))
    problems.extend(_loss_problems(cfg))
    problems.extend(_quant_problems(cfg))
    problems.extend(_method_problems(cfg))
    problems.extend(_data_problems(cfg.data))
    vocab = cfg.model.config.get("vocab_size")  # the file's, for a model read from a file (with_file_shape)
    if cfg.data.name == "text" and isinstance(vocab, int) and vocab < BYTE_VOCAB:
        problems.append(f"model.config.vocab_size must be at least {BYTE_VOCAB} with data=text (its token ids are "
                        f"the text's bytes, 0-255), got {vocab}")
    problems.extend(_strategy_problems(cfg.strategy, t))
    need(cfg.mode in MODES, "mode", cfg.mode, f"one of {', '.join(MODES)}")
    if cfg.budget_gb is not None:
        need(cfg.budget_gb > 0, "budget_gb", cfg.budget_gb, "a positive number of GB (1e9 bytes)")
    return problems


def _positive_int_or_auto(size: object) -> bool:
    if size == "auto":
        return True
    return isinstance(size, int) and not isinstance(size, bool) and size > 0


def _option_problems(cfg: SweepbpConfig) -> list[str]:
    """A group's `name` must be the option its schema belongs to: `memory=none memory.name=ckpt` would
    run ckpt without ckpt's fields (`memory.every`)."""
    problems = []
    for group, schemas in NAMED_SCHEMAS.items():
        node = getattr(cfg, group)
        if node.name not in schemas:
            problems.append(f"{group}.name must be one of {', '.join(schemas)}, got {node.name!r}")
        elif type(node) is not schemas[node.name]:
            own = " or ".join(name for name, schema in schemas.items() if schema is type(node))
            problems.append(f"{group}.name must be {own}, the chosen option's own name (choose {node.name} with "
                            f"{group}={node.name}, not {group}.name={node.name}), got {node.name!r}")
    return problems


def _field_problems(node: object, group: str, checks: tuple[tuple[str, Any, str], ...]) -> list[str]:
    """One line per field an option has (not every option of a group has every field) that fails its check:
    (field, predicate, what is allowed)."""
    problems = []
    for name, ok, allowed in checks:
        value = getattr(node, name, None)
        if value is not None and not ok(value):
            problems.append(f"{group}.{name} must be {allowed}, got {value!r}")
    return problems


def _memory_problems(memory: MemoryConfig) -> list[str]:
    return _field_problems(memory, "memory", (
        ("every", lambda v: v >= 1, "a positive integer (1 = every layer)"),
        ("policy", lambda v: v in SELECTIVE_POLICIES, f"one of {', '.join(SELECTIVE_POLICIES)}"),
        ("min_bytes", lambda v: v >= 0, "zero or a positive number of bytes")))


def _quant_problems(cfg: SweepbpConfig) -> list[str]:
    quant = cfg.quant
    problems = _field_problems(quant, "quant", (
        ("quant_type", lambda v: v in ("nf4", "fp4"), "nf4 or fp4"),
        ("compute_dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
        ("threshold", lambda v: v >= 0, "zero or positive")))
    if quant.name != "none" and cfg.trainer.precision.endswith("-mixed") and (cfg.mode == "predict"
                                                                              or cfg.batch.size == "auto"):
        problems.append(f"trainer.precision must be a -true or 32 precision to predict quant={quant.name}, got "
                        f"{cfg.trainer.precision!r} (autocast is traced on fake tensors, which bitsandbytes' "
                        "parameters cannot wrap; measure it with mode=measure and a fixed batch.size)")
    if quant.name != "none" and cfg.strategy.name == "fsdp":
        problems.append(f"strategy must be single or ddp with quant={quant.name}, got 'fsdp' (sharding bitsandbytes' "
                        "packed weights needs quant_storage handling sweepbp does not do)")
    return problems


def _method_problems(cfg: SweepbpConfig) -> list[str]:
    problems = _field_problems(cfg.optim, "optim", (
        ("min_8bit_size", lambda v: v >= 0, "zero or a positive number of elements"),
        ("momentum", lambda v: 0 <= v < 1, "in [0, 1)")))
    if cfg.method.name == "full" and cfg.quant.name != "none":
        problems.append(f"method must be lora or dora with quant={cfg.quant.name}, got 'full' (quantised weights are "
                        "not trained)")
    if cfg.optim.name == "paged_adamw8bit" and (cfg.mode == "predict" or cfg.batch.size == "auto"):
        problems.append("optim must be adamw, adamw8bit, adafactor or sgd to predict, got 'paged_adamw8bit' (its "
                        "state lives in CUDA unified memory, which a trace without a GPU cannot allocate)")
    elif cfg.optim.name == "paged_adamw8bit" and cfg.trainer.accelerator == "cpu":
        problems.append("optim must be adamw, adamw8bit, adafactor or sgd on trainer.accelerator=cpu, got "
                        "'paged_adamw8bit' (paged state needs CUDA)")
    return problems


def _loss_problems(cfg: SweepbpConfig) -> list[str]:
    loss = cfg.loss
    problems = []
    chunks = getattr(loss, "chunks", None)
    if chunks is not None and not 1 <= chunks <= max(cfg.batch.seq_len, 1):
        problems.append(f"loss.chunks must be between 1 and batch.seq_len={cfg.batch.seq_len}, got {chunks!r}")
    if loss.name in FUSED_LOSSES and cfg.model.pretrained_path is None:
        rescaled = [key for key in HEAD_RESCALING_FIELDS if cfg.model.config.get(key) not in (None, 1, 1.0)]
        if rescaled:
            problems.append(f"loss must be standard or chunked for a model whose head rescales its logits "
                            f"(model.config.{rescaled[0]}), got {loss.name!r}")
    if loss.name == "liger":
        if cfg.mode == "predict":
            problems.append("loss must be standard, chunked or fused with mode=predict, got 'liger' (its Triton "
                            "kernels cannot be traced without a GPU; loss=fused predicts a fused loss in PyTorch)")
        elif cfg.trainer.accelerator == "cpu":
            problems.append("loss must be standard, chunked or fused on trainer.accelerator=cpu, got 'liger' "
                            "(liger-kernel runs on CUDA GPUs only)")
    return problems


def _strategy_problems(strategy: StrategyConfig, trainer: TrainerConfig) -> list[str]:
    if strategy.name not in NAMED_SCHEMAS["strategy"]:
        return []  # _option_problems says so
    if strategy.name == "single" and trainer.devices > 1:
        return [f"trainer.devices must be 1 with strategy=single, got {trainer.devices} (use strategy=ddp or fsdp)"]
    if strategy.name == "fsdp" and trainer.accelerator == "cpu":
        return ["strategy must be single or ddp on trainer.accelerator=cpu, got 'fsdp' (FSDP needs GPUs)"]
    sharding = getattr(strategy, "sharding_strategy", None)
    if sharding is not None and sharding not in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
        return [f"strategy.sharding_strategy must be FULL_SHARD, SHARD_GRAD_OP or NO_SHARD, got {sharding!r}"]
    return []


def _data_problems(data: DataConfig) -> list[str]:
    if data.name not in NAMED_SCHEMAS["data"]:
        return []  # _option_problems says so
    if data.name == "text":
        if not data.path or not Path(os.path.expanduser(data.path)).is_file():
            return [f"data.path must be an existing local text file, got {data.path!r}"]
    if not isinstance(data, DatasetConfig) or type(data) is not NAMED_SCHEMAS["data"][data.name]:
        return []  # not a dataset, or one whose name disagrees with its option (_option_problems says so)
    problems = _field_problems(data, "data", (
        ("pad_to", lambda v: v in PAD_TO, " or ".join(PAD_TO)),
        ("order", lambda v: v in DATA_ORDERS, " or ".join(DATA_ORDERS))))
    return problems + dataset_problems(data.name, data.path, data.text_field, data.tokenizer_path)
