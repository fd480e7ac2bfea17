"""Typed configuration schema of every config group, and its validation.

Each group (`model`, `lora`, `memory`, `batch`, `trainer`, `data`, `tracking`) has a dataclass
registered in Hydra's ConfigStore as `<group>/<name>_schema`; the YAML options under `conf/`
extend them. `to_run_config` turns a composed DictConfig into a `RunConfig` and validates it
without importing torch, transformers or mlflow, so bad input fails in well under a second.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from omegaconf import MISSING, DictConfig, OmegaConf

from sweepbp.datafile import dataset_problems

GB = 1e9  # budget_gb and every figure shown in GB are decimal gigabytes, like device memory sizes
GROUPS = ("model", "quant", "method", "lora", "memory", "loss", "optim", "batch", "trainer", "data", "tracking",
          "strategy")
ADAPTER_DTYPES = ("float32", "model")  # lora.adapter_dtype
PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa")
MODES = ("measure", "predict")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
SELECTIVE_POLICIES = ("save_matmuls", "save_attention")  # memory.policy of memory=selective (see memory/selective.py)
# Config fields of model families whose causal-LM head rescales the logits after the projection: the
# fused losses compute the projection themselves and refuse them (Gemma's soft-capping they apply).
HEAD_RESCALING_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
FUSED_LOSSES = ("fused", "liger")  # loss options that project the hidden states themselves
# Linear sub-modules of the decoder families sweepbp builds from a config, per `model.arch`, for a one-line
# error when `lora.target_modules` names none of a shipped architecture's layers (Phi-3 fuses q/k/v and gate/up).
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCH_LINEAR_MODULES = {**dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"),
                                       LLAMA_LINEAR_MODULES),
                       "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
ALL_LINEAR = "all-linear"  # lora.target_modules=[all-linear]: every linear layer but the output head (peft's)


class ConfigError(ValueError):
    """User error in the configuration: carries one line per problem, no traceback wanted."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class ModelConfig:
    """The network to fine-tune."""

    arch: str = "llama"  # HF model_type used to build a random-init model from `config`
    config: dict[str, Any] = field(default_factory=dict)  # HF config fields of a random-init model
    dtype: str = "float32"  # weight dtype: float32, bfloat16 or float16
    attn_implementation: str = "sdpa"  # eager or sdpa: changes attention memory a lot
    pretrained_path: Optional[str] = None  # local HF folder with safetensors weights; never the network
    # a local config.json (or a folder holding one): that shape with random init, no weights; `arch` and
    # `config` are then the file's (model.config is not applied on top)
    config_path: Optional[str] = None


@dataclass
class LoraConfig:
    """The LoRA adapter (peft) put on the frozen base model."""

    r: int = 8  # adapter rank: more capacity, more trainable memory
    alpha: float = 16.0  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))
    # float32: peft's default, adapters of a 16-bit model kept in fp32 (each adapted layer then also saves an
    # fp32 copy of its input); model: the adapters in the model's dtype
    adapter_dtype: str = "float32"


@dataclass
class MethodConfig:
    """What the step trains. `name` selects lora (peft's LoRA, fields in the `lora` group), dora (peft's DoRA:
    LoRA plus a trained magnitude per output feature, same fields) or full (every weight, no adapter)."""

    name: str = "lora"


@dataclass
class OptimConfig:
    """The optimizer (its lr and weight_decay are trainer's). `name` selects adamw (torch), adamw8bit and
    paged_adamw8bit (bitsandbytes), adafactor (torch) or sgd (torch, with momentum)."""

    name: str = "adamw"


@dataclass
class Bnb8bitOptimConfig(OptimConfig):
    """bitsandbytes' 8-bit AdamW: both moments in 8 bits, blockwise scaled."""

    name: str = "adamw8bit"
    min_8bit_size: int = 4096  # tensors with fewer elements keep 32-bit state (tiny models: lower it)


@dataclass
class SgdOptimConfig(OptimConfig):
    """SGD with momentum: one state tensor per weight (none with momentum 0)."""

    name: str = "sgd"
    momentum: float = 0.9


@dataclass
class MemoryConfig:
    """How activations are kept for the backward pass. `name` selects the strategy."""

    name: str = "none"


@dataclass
class CkptMemoryConfig(MemoryConfig):
    """Activation checkpointing: keep only layer inputs, recompute the layer in the backward."""

    name: str = "ckpt"
    every: int = 1  # checkpoint every k-th decoder layer; 1 = all layers


@dataclass
class SelectiveMemoryConfig(MemoryConfig):
    """Selective checkpointing: keep the outputs of expensive operators, recompute the cheap ones."""

    name: str = "selective"
    policy: str = "save_matmuls"  # save_matmuls: keep attention + full-rank matmuls; save_attention: attention only
    every: int = 1  # apply it to every k-th decoder layer; 1 = all layers


@dataclass
class OffloadMemoryConfig(MemoryConfig):
    """Activation offloading: saved activations wait in host memory between the forward and the backward."""

    name: str = "offload"
    min_bytes: int = 1024  # saved tensors smaller than this stay on the device


@dataclass
class CkptOffloadMemoryConfig(MemoryConfig):
    """Checkpointing whose kept layer inputs wait in host memory instead of on the device."""

    name: str = "ckpt_offload"
    every: int = 1  # checkpoint (and offload the input of) every k-th decoder layer; 1 = all layers
    min_bytes: int = 1024  # saved tensors smaller than this stay on the device


@dataclass
class QuantConfig:
    """Quantised base weights (bitsandbytes). `name` selects none, nf4 (QLoRA's 4-bit) or int8 (LLM.int8)."""

    name: str = "none"


@dataclass
class Nf4QuantConfig(QuantConfig):
    """4-bit base weights, bitsandbytes' Linear4bit: QLoRA."""

    name: str = "nf4"
    quant_type: str = "nf4"  # nf4 (QLoRA's NormalFloat) or fp4
    double_quant: bool = True  # quantise the per-64-weight scales too (~0.4 bits less per weight)
    compute_dtype: str = "bfloat16"  # dtype the weights are dequantised to for each matmul
    prepare: bool = True  # peft's prepare_model_for_kbit_training: every other parameter to fp32


@dataclass
class Int8QuantConfig(QuantConfig):
    """8-bit base weights, bitsandbytes' Linear8bitLt: LLM.int8()."""

    name: str = "int8"
    threshold: float = 6.0  # outlier threshold: input features above it are multiplied in 16-bit
    prepare: bool = True  # peft's prepare_model_for_kbit_training: every other parameter to fp32


@dataclass
class LossConfig:
    """How the output projection and the cross-entropy are computed. `name` selects the option."""

    name: str = "standard"


@dataclass
class ChunkedLossConfig(LossConfig):
    """Cross-entropy over slices of the sequence, each upcast to fp32 on its own (torchtune's)."""

    name: str = "chunked"
    chunks: int = 8  # slices of the sequence: more, smaller fp32 transients (the logits still exist whole)


@dataclass
class FusedLossConfig(LossConfig):
    """Projection and cross-entropy chunk by chunk in one autograd function: no full logits tensor."""

    name: str = "fused"
    chunks: int = 8  # slices of the batch's tokens: more, smaller transients, more (smaller) matmuls


@dataclass
class BatchConfig:
    """Shape of one optimizer step's batch."""

    # sequences per step, or "auto" = the largest that fits budget_gb. Typed Any because OmegaConf 2.3
    # cannot merge a nested Union[int, str] field; validate() checks it is a positive int or "auto".
    size: Any = 4
    seq_len: int = 128  # tokens per sequence
    accumulate: int = 1  # micro-batches of `size` per optimizer step (gradient accumulation)
    # with size=auto: sequences per optimizer step to reach; auto picks the largest micro-batch that fits and
    # divides it, and accumulates the rest (null: no accumulation search)
    effective_size: Optional[int] = None


@dataclass
class TrainerConfig:
    """The training loop: steps, optimizer, precision, device."""

    steps: int = 8  # steps in total, warm-up and traced step included
    warmup_steps: int = 2  # first steps, excluded from timing (>= 1: step 1 allocates optimizer state)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    seed: int = 0  # seeds weights, adapter and data
    precision: str = "32-true"  # Lightning precision
    accelerator: str = "auto"  # auto picks the GPU when there is one
    devices: int = 1  # devices (processes) of one job


@dataclass
class DataConfig:
    """Where the token batches come from. `name` selects synthetic tokens, a local text file (both one
    full-length row per sequence) or a local dataset of examples (jsonl, parquet: `DatasetConfig`)."""

    name: str = "synthetic"
    path: Optional[str] = None  # text: a local UTF-8 file, tokenized bytewise; jsonl, parquet: the dataset file


@dataclass
class DatasetConfig(DataConfig):
    """A local dataset of examples of varied length, read with Hugging Face `datasets` (never downloaded),
    tokenized, truncated at batch.seq_len, padded or packed (train/dataset.py, train/batching.py)."""

    text_field: str = "text"  # the field holding each example: text, or a list of {role, content} messages
    tokenizer_path: Optional[str] = None  # a local tokenizer folder; null: model.pretrained_path's, else bytewise
    packing: bool = False  # true: examples joined (EOS between) and cut into full rows: no padding at all
    pad_to: str = "longest"  # without packing: longest (of the micro-batch) or max_length (batch.seq_len)
    order: str = "shuffle"  # shuffle (seeded by trainer.seed) or longest_first (batches of similar length)


@dataclass
class JsonlDataConfig(DatasetConfig):
    """One JSON object per line."""

    name: str = "jsonl"


@dataclass
class ParquetDataConfig(DatasetConfig):
    """A Parquet file (pyarrow, which comes with `datasets`)."""

    name: str = "parquet"


@dataclass
class TrackingConfig:
    """Where each job is recorded. `name` is mlflow or none."""

    name: str = "mlflow"
    uri: str = "sqlite:///mlflow.db"  # MLflow tracking URI; relative sqlite paths are taken from the launch folder
    experiment: str = "sweepbp"  # MLflow experiment name


@dataclass
class StrategyConfig:
    """How one job uses `trainer.devices` devices: single (one device), ddp (one process per device,
    gradients all-reduced; gloo on CPU, nccl on GPU) or fsdp (weights sharded across GPUs)."""

    name: str = "single"


@dataclass
class FsdpStrategyConfig(StrategyConfig):
    """Fully sharded data parallel (Lightning's FSDPStrategy): GPUs only."""

    name: str = "fsdp"
    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD: params, grads and optimizer state sharded; SHARD_GRAD_OP: not params


@dataclass
class SweepbpConfig:
    """The root: one job = one choice per group plus the top-level keys."""

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    method: MethodConfig = MISSING
    lora: LoraConfig = MISSING
    memory: MemoryConfig = MISSING
    loss: LossConfig = MISSING
    optim: OptimConfig = MISSING
    batch: BatchConfig = MISSING
    trainer: TrainerConfig = MISSING
    data: DataConfig = MISSING
    tracking: TrackingConfig = MISSING
    strategy: StrategyConfig = MISSING
    mode: str = "measure"  # measure: run it; predict: trace it on fake tensors
    budget_gb: Optional[float] = None  # emulate a device with this much memory (GB = 1e9 bytes)
    resume: bool = False  # skip jobs whose exact config already finished ok or oom in the store
    # write memory_snapshot.pickle and .html of the traced step (PyTorch's memory viewer): costs the traced
    # step some time and the job folder some MB, never the timed steps (docs/snapshot.md)
    snapshot: bool = False

    @property
    def budget_bytes(self) -> int | None:
        """`budget_gb` in bytes (None: no budget)."""
        return int(self.budget_gb * GB) if self.budget_gb is not None else None

    @property
    def world_size(self) -> int:
        """Processes of one job: trainer.devices for ddp and fsdp, else 1."""
        return self.trainer.devices if self.strategy.name in ("ddp", "fsdp") else 1


# Groups whose `name` selects behaviour: each name and the schema its fields come from.
NAMED_SCHEMAS: dict[str, dict[str, type]] = {
    "memory": {"none": MemoryConfig, "ckpt": CkptMemoryConfig, "selective": SelectiveMemoryConfig,
               "offload": OffloadMemoryConfig, "ckpt_offload": CkptOffloadMemoryConfig},
    "quant": {"none": QuantConfig, "nf4": Nf4QuantConfig, "int8": Int8QuantConfig},
    "method": {"lora": MethodConfig, "dora": MethodConfig, "full": MethodConfig},
    "optim": {"adamw": OptimConfig, "adamw8bit": Bnb8bitOptimConfig, "paged_adamw8bit": Bnb8bitOptimConfig,
              "adafactor": OptimConfig, "sgd": SgdOptimConfig},
    "loss": {"standard": LossConfig, "chunked": ChunkedLossConfig, "fused": FusedLossConfig, "liger": LossConfig},
    "strategy": {"single": StrategyConfig, "ddp": StrategyConfig, "fsdp": FsdpStrategyConfig},
    "data": {"synthetic": DataConfig, "text": DataConfig, "jsonl": JsonlDataConfig, "parquet": ParquetDataConfig},
}
DATASETS = ("jsonl", "parquet")  # data options that are datasets of examples (DatasetConfig)
PAD_TO = ("longest", "max_length")  # data.pad_to
DATA_ORDERS = ("shuffle", "longest_first")  # data.order
# Fields of a random-init model.config that must be positive integers (when given).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclass
class RunConfig:
    """A validated job config plus the group options it was composed from."""

    cfg: SweepbpConfig
    choices: dict[str, str]  # group -> option name, e.g. memory -> ckpt


SCHEMAS: dict[str, list[tuple[str, type]]] = {
    "model": [("model", ModelConfig)],
    "lora": [("lora", LoraConfig)],
    "memory": list(NAMED_SCHEMAS["memory"].items()),
    "quant": [("quant", QuantConfig), ("nf4", Nf4QuantConfig), ("int8", Int8QuantConfig)],
    "method": [("method", MethodConfig)],
    "optim": [("optim", OptimConfig), ("adamw8bit", Bnb8bitOptimConfig), ("sgd", SgdOptimConfig)],
    "loss": [("loss", LossConfig), ("chunked", ChunkedLossConfig), ("fused", FusedLossConfig)],
    "batch": [("batch", BatchConfig)],
    "trainer": [("trainer", TrainerConfig)],
    "data": [("data", DataConfig), ("jsonl", JsonlDataConfig), ("parquet", ParquetDataConfig)],
    "tracking": [("tracking", TrackingConfig)],
    "strategy": [("strategy", StrategyConfig), ("fsdp", FsdpStrategyConfig)],
}


def schema_of(group: str, name: str | None) -> type:
    """The schema a group's config has: the one its `name` selects (memory, strategy), else the group's own."""
    return NAMED_SCHEMAS.get(group, {}).get(name or "", SCHEMAS[group][0][1])


def register_schemas() -> None:
    """Register every schema with Hydra's ConfigStore (`<group>/<name>_schema`)."""
    from hydra.core.config_store import ConfigStore  # Hydra only where configs are composed, not in jobs

    store = ConfigStore.instance()
    store.store(name="sweepbp_schema", node=SweepbpConfig)
    for group, entries in SCHEMAS.items():
        for name, schema in entries:
            store.store(group=group, name=f"{name}_schema", node=schema)


def to_run_config(cfg: DictConfig, choices: dict[str, str]) -> RunConfig:
    """Convert a composed config to typed objects and validate it; raise ConfigError listing all problems."""
    try:
        typed = OmegaConf.to_object(cfg)
    except Exception as err:  # OmegaConf's own type errors (missing values, bad types)
        raise ConfigError([_omegaconf_message(err)]) from None
    assert isinstance(typed, SweepbpConfig)
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
        problems.extend(_pretrained_problems(m.pretrained_path))
        if m.config_path is not None:
            problems.append(f"model.config_path must be null with model.pretrained_path (its config.json is the "
                            f"shape), got {m.config_path!r}")
    elif m.config_path is not None:
        problems.extend(_config_file_problems(m.config_path))
    elif not m.config:
        problems.append("model.config must hold the HF config fields of a random-init model, got {}")
    else:
        problems.extend(_shape_problems(m.config))
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
    problems.extend(_strategy_problems(cfg.strategy, t))
    need(cfg.mode in MODES, "mode", cfg.mode, f"one of {', '.join(MODES)}")
    if cfg.budget_gb is not None:
        need(cfg.budget_gb > 0, "budget_gb", cfg.budget_gb, "a positive number of GB (1e9 bytes)")
    return problems


def _positive_int_or_auto(size: object) -> bool:
    if size == "auto":
        return True
    return isinstance(size, int) and not isinstance(size, bool) and size > 0


def config_file(path: str) -> Path:
    """The config.json a `model.config_path` names: the file itself, or the one in the folder."""
    given = Path(os.path.expanduser(path))
    return given / "config.json" if given.is_dir() else given


def read_config_file(path: str) -> dict[str, Any]:
    """The fields of a `model.config_path` file; ConfigError naming the file for what cannot be read."""
    import json

    file = config_file(path)
    if not file.is_file():
        raise ConfigError([f"model.config_path must be a config.json file or a folder holding one, got {path!r}"])
    try:
        fields = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError([f"model.config_path {str(file)!r} is not JSON: {str(err).splitlines()[0]}"]) from None
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise ConfigError([f"model.config_path {str(file)!r} must hold a Hugging Face config with a string "
                           "model_type field"])
    return fields


def _config_file_problems(path: str) -> list[str]:
    try:
        fields = read_config_file(path)
    except ConfigError as err:
        return err.problems
    file = str(config_file(path))
    return [line.replace("model.config.", f"{file}: field ", 1) for line in _shape_problems(fields)]


def _pretrained_problems(path: str) -> list[str]:
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        return [f"model.pretrained_path must be an existing local folder, got {path!r}"]
    if not (folder / "config.json").is_file():
        return [f"model.pretrained_path must hold a Hugging Face config.json, got {path!r}"]
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            return [f"model.pretrained_path must hold safetensors weights, got pickle weights only in {path!r} "
                    "(refused: loading pickle can execute code)"]
        return [f"model.pretrained_path must hold *.safetensors weights, got none in {path!r}"]
    broken = [f"{file} ({why})" for file in sorted(folder.glob("*.safetensors")) if (why := _safetensors_problem(file))]
    if broken:
        return [f"model.pretrained_path must hold readable safetensors files, got a broken one: {broken[0]}"]
    return []


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's layout (an 8-byte header length, a JSON header, then exactly the
    bytes the header's data offsets cover), read from its header alone; None when it is sound."""
    import json
    import struct

    size = file.stat().st_size
    if size < 8:
        return f"header too small: the file has {size} bytes"
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            return f"header length {length:,} exceeds the file's {size:,} bytes (truncated?)"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"header is not JSON: {err}"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]]
    if ends and max(ends) != size - 8 - length:
        return f"its tensors need {max(ends):,} bytes of data, the file holds {size - 8 - length:,} (truncated?)"
    return None


def _shape_problems(config: dict[str, Any]) -> list[str]:
    """What transformers would refuse, or build into a model that cannot train, in a random-init shape."""
    problems = []
    for key in SHAPE_FIELDS:
        value = config.get(key)
        if key in config and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            problems.append(f"model.config.{key} must be a positive integer, got {value!r}")
    if problems:
        return problems
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    hidden = config.get("hidden_size")
    if heads and hidden and "head_dim" not in config and hidden % heads:
        problems.append(f"model.config.num_attention_heads must divide model.config.hidden_size={hidden} "
                        f"(or set model.config.head_dim), got {heads}")
    pad, vocab = config.get("pad_token_id"), config.get("vocab_size")
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        problems.append(f"model.config.pad_token_id must be below model.config.vocab_size={vocab}, got {pad}")
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"model.config.num_key_value_heads must divide model.config.num_attention_heads={heads}, "
                        f"got {kv_heads}")
    return problems


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


def config_as_dict(cfg: SweepbpConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (JSON-ready), credentials in tracking.uri redacted."""
    container = OmegaConf.to_container(_redacted(cfg), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def _redacted(cfg: SweepbpConfig) -> DictConfig:
    """The config as an OmegaConf node with tracking.uri redacted: what is written or logged, never used."""
    node = OmegaConf.structured(cfg)
    if node.tracking.uri:
        node.tracking.uri = redact_uri(node.tracking.uri)
    return node


def leaf_params(cfg: SweepbpConfig) -> dict[str, str]:
    """Every leaf of the config under its dotted path, as strings (MLflow params)."""
    return dotted_leaves(config_as_dict(cfg))


def dotted_leaves(container: dict[str, Any]) -> dict[str, str]:
    """Every leaf of a nested dict under its dotted path, as strings (a results.json config, too)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)

    walk("", container)
    return flat


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `dotted_leaves`: {"lora.r": "8"} -> {"lora": {"r": "8"}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def config_yaml(cfg: SweepbpConfig) -> str:
    """The resolved config as YAML, the artifact a rerun composes from (credentials redacted)."""
    return OmegaConf.to_yaml(_redacted(cfg))


def redact_uri(uri: str) -> str:
    """Hide user:password@ and token-like query values wherever a URI is printed or logged.

    Edits the text in place rather than re-assembling the URI: urlunsplit would turn
    sqlite:////abs/path into sqlite://abs/path.
    """
    parts = urlsplit(uri)
    shown = uri
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        shown = shown.replace(userinfo + "@", "***@", 1)
    if parts.query:
        query = re.sub(r"(?i)((?:token|password|secret|key)[^=&]*=)[^&]*", r"\1***", parts.query)
        shown = shown.replace("?" + parts.query, "?" + query, 1)
    return shown
