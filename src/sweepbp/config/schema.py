"""The typed schema of every config group: one dataclass per group and per option with its own fields.

Each group has a dataclass registered in Hydra's ConfigStore as `<group>/<name>_schema`; the YAML options
under `conf/` extend them. A group whose `name` selects behaviour (memory, quant, method, optim, loss,
strategy, data) maps each name to its schema in `NAMED_SCHEMAS`. Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

GB = 1e9  # budget_gb and every figure shown in GB are decimal gigabytes, like device memory sizes
GROUPS = ("model", "quant", "method", "lora", "memory", "loss", "optim", "batch", "trainer", "data", "tracking",
          "strategy")
ADAPTER_DTYPES = ("float32", "model")  # lora.adapter_dtype
PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
DTYPES = ("float32", "bfloat16", "float16")
BYTE_VOCAB = 256  # data=text and bytewise tokenization: the token ids are the UTF-8 bytes, 0-255
ATTENTION = ("eager", "sdpa")
MODES = ("measure", "predict")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
SELECTIVE_POLICIES = ("save_matmuls", "save_attention")  # memory.policy of memory=selective (see memory/selective.py)
# Config fields of model families whose causal-LM head rescales the logits after the projection: the
# fused losses compute the projection themselves and refuse them (Gemma's soft-capping they apply).
HEAD_RESCALING_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
BNB_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")  # optim options of bitsandbytes (the `.[quant]` extra)
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

    @property
    def uses_bitsandbytes(self) -> bool:
        """Whether the job needs bitsandbytes: quantised base weights or one of its 8-bit optimizers."""
        return needs_bitsandbytes("quant", self.quant.name) or needs_bitsandbytes("optim", self.optim.name)


def needs_bitsandbytes(group: str, option: str) -> bool:
    """Whether an option of a group needs bitsandbytes (the `.[quant]` extra): a quant other than none, an 8-bit
    optimizer."""
    return (group == "quant" and option != "none") or (group == "optim" and option in BNB_OPTIMIZERS)


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
