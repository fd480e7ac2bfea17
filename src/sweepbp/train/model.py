"""Building the base model: random init from a config, or a local safetensors checkpoint."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from sweepbp.config import ConfigError, ModelConfig, config_file, read_config_file
from sweepbp.train.flops import training_flops_per_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(model: ModelConfig, depth: int | None = None):
    """The Hugging Face config of a model option; its complaints become one-line errors. With `depth`, the same
    model with that many decoder layers (mode=predict's depth extrapolation traces shallow twins)."""
    if model.pretrained_path is not None:
        try:
            config = AutoConfig.from_pretrained(model.pretrained_path, local_files_only=True)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError([f"model.pretrained_path {model.pretrained_path!r} holds no valid config: "
                               f"{_reason(err)}"]) from None
    elif model.config_path is not None:
        fields = read_config_file(model.config_path)
        try:
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError([f"model.config_path {str(config_file(model.config_path))!r} is not a valid config: "
                               f"{_reason(err)}"]) from None
    else:
        try:
            # a copy: transformers writes into the nested dicts it is given (rope_theta into rope_scaling), and
            # the job's config is what it records and hashes
            config = AutoConfig.for_model(model.arch, **copy.deepcopy(model.config))
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError([f"model.config is not a valid {model.arch} config: {_reason(err)}"]) from None
    config.use_cache = False  # training: a KV cache only costs memory
    if depth is not None:
        with_depth(config, depth)
    return config


def _reason(err: Exception) -> str:
    """transformers' complaint in a line: an unknown model_type's lists every known one (12 kB), cut there."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    known = first.find(". Should contain one of")
    if known != -1:
        return first[:known] + " (not a model_type this transformers version knows)"
    return first if len(first) <= 300 else first[:300] + "..."


def per_layer_lists(config) -> dict[str, list]:
    """The config's fields that hold one entry per decoder layer (e.g. `layer_types`: sliding or full attention)."""
    depth = config.num_hidden_layers
    return {name: list(value) for name, value in vars(config).items()
            if isinstance(value, (list, tuple)) and len(value) == depth and depth > 1}


def with_depth(config, depth: int) -> None:
    """Make `config` the same model with `depth` layers: per-layer lists keep their first `depth` entries."""
    for name, values in per_layer_lists(config).items():
        setattr(config, name, values[:depth])
    config.num_hidden_layers = depth


def build_model(model: ModelConfig, device: torch.device, seed: int, depth: int | None = None) -> PreTrainedModel:
    """Build the model directly in its dtype on its device (no fp32 detour, no download); with `depth`, a
    random-init twin of it with that many decoder layers. On `meta` (mode=predict's trace) a local checkpoint
    is built from its config alone: the same modules and shapes, and no weights to read (transformers refuses
    `from_pretrained` under a meta device)."""
    dtype = DTYPES[model.dtype]
    config = hf_config(model, depth)
    torch.manual_seed(seed)
    with torch.device(device):
        if model.pretrained_path is not None and depth is None and device.type != "meta":
            built = AutoModelForCausalLM.from_pretrained(
                model.pretrained_path, config=config, dtype=dtype, attn_implementation=model.attn_implementation,
                local_files_only=True, use_safetensors=True)
        else:
            built = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=model.attn_implementation)
    return built.to(device)


def parameter_counts(model: torch.nn.Module, seq_len: int) -> dict[str, float]:
    """Trainable and frozen parameter counts, and the model FLOPs per token of a training step (train/flops.py:
    4N for frozen weights, 6N for trained ones, so 6N for method=full)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.get_input_embeddings().weight
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    config = model.config
    # the embedding lookup is no matmul: it leaves whichever set holds it (the trained one under method=full)
    trained_matmul = trainable - (embedding.numel() if embedding.requires_grad else 0)
    frozen_matmul = frozen - (0 if embedding.requires_grad else embedding.numel())
    flops = training_flops_per_token(frozen_matmul, trained_matmul, config.num_hidden_layers, seq_len,
                                     config.hidden_size)
    return {"trainable_params": float(trainable), "frozen_params": float(frozen), "flops_per_token": flops}
