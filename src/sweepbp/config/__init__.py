"""Typed configuration of every config group, its validation, and the config as plain values.

`schema` holds the dataclasses Hydra composes into (one per group and per option with fields of its own),
`validate` turns a composed config into a checked `RunConfig` (one line per problem), `model_source` checks
where a model's shape and weights come from, and `values` writes a config out (dicts, params, YAML) with its
credentials hidden. Nothing here imports torch, transformers or mlflow.
"""

from sweepbp.config.model_source import config_file, read_config_file
from sweepbp.config.schema import (
    ACCELERATORS,
    ADAPTER_DTYPES,
    ALL_LINEAR,
    ARCH_LINEAR_MODULES,
    ATTENTION,
    BNB_OPTIMIZERS,
    DATA_ORDERS,
    DATASETS,
    DTYPES,
    FUSED_LOSSES,
    GB,
    GROUPS,
    HEAD_RESCALING_FIELDS,
    LLAMA_LINEAR_MODULES,
    MODES,
    NAMED_SCHEMAS,
    PAD_TO,
    PRECISIONS,
    SCHEMAS,
    SELECTIVE_POLICIES,
    SHAPE_FIELDS,
    BatchConfig,
    Bnb8bitOptimConfig,
    ChunkedLossConfig,
    CkptMemoryConfig,
    CkptOffloadMemoryConfig,
    ConfigError,
    DataConfig,
    DatasetConfig,
    FsdpStrategyConfig,
    FusedLossConfig,
    Int8QuantConfig,
    JsonlDataConfig,
    LoraConfig,
    LossConfig,
    MemoryConfig,
    MethodConfig,
    ModelConfig,
    Nf4QuantConfig,
    OffloadMemoryConfig,
    OptimConfig,
    ParquetDataConfig,
    QuantConfig,
    RunConfig,
    SelectiveMemoryConfig,
    SgdOptimConfig,
    StrategyConfig,
    SweepbpConfig,
    TrackingConfig,
    TrainerConfig,
    needs_bitsandbytes,
    register_schemas,
    schema_of,
)
from sweepbp.config.validate import to_run_config, validate
from sweepbp.config.values import config_as_dict, config_yaml, dotted_leaves, leaf_params, nested, redact_uri

__all__ = [
    "ACCELERATORS", "ADAPTER_DTYPES", "ALL_LINEAR", "ARCH_LINEAR_MODULES", "ATTENTION", "BNB_OPTIMIZERS", "DATA_ORDERS",
    "DATASETS", "DTYPES", "FUSED_LOSSES", "GB", "GROUPS", "HEAD_RESCALING_FIELDS", "LLAMA_LINEAR_MODULES", "MODES",
    "NAMED_SCHEMAS", "PAD_TO", "PRECISIONS", "SCHEMAS", "SELECTIVE_POLICIES", "SHAPE_FIELDS", "BatchConfig",
    "Bnb8bitOptimConfig", "ChunkedLossConfig", "CkptMemoryConfig", "CkptOffloadMemoryConfig", "ConfigError",
    "DataConfig", "DatasetConfig", "FsdpStrategyConfig", "FusedLossConfig", "Int8QuantConfig", "JsonlDataConfig",
    "LoraConfig", "LossConfig", "MemoryConfig", "MethodConfig", "ModelConfig", "Nf4QuantConfig",
    "OffloadMemoryConfig", "OptimConfig", "ParquetDataConfig", "QuantConfig", "RunConfig", "SelectiveMemoryConfig",
    "SgdOptimConfig", "StrategyConfig", "SweepbpConfig", "TrackingConfig", "TrainerConfig", "config_as_dict",
    "config_file", "config_yaml", "dotted_leaves", "leaf_params", "needs_bitsandbytes", "nested", "read_config_file",
    "redact_uri", "register_schemas", "schema_of", "to_run_config", "validate",
]
