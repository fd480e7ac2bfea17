"""Where a model's shape and weights come from: a `model.config_path` file, a `model.pretrained_path` folder,
or the fields of a random-init `model.config`, each checked before any job starts (headers only, no weights read).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from sweepbp.config.schema import SHAPE_FIELDS, ConfigError


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


def config_file_problems(path: str) -> list[str]:
    try:
        fields = read_config_file(path)
    except ConfigError as err:
        return err.problems
    file = str(config_file(path))
    return [f"{file}: {line}" for line in shape_problems(fields, where="field ")]


def pretrained_problems(path: str) -> list[str]:
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


def shape_problems(config: dict[str, Any], where: str = "model.config.") -> list[str]:
    """What transformers would refuse, or build into a model that cannot train, in a random-init shape; each key
    named `where` + its name (a file's problems are named as its fields)."""
    problems = []
    for key in SHAPE_FIELDS:
        value = config.get(key)
        if key in config and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            problems.append(f"{where}{key} must be a positive integer, got {value!r}")
    if problems:
        return problems
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    hidden = config.get("hidden_size")
    if heads and hidden and "head_dim" not in config and hidden % heads:
        problems.append(f"{where}num_attention_heads must divide {where}hidden_size={hidden} "
                        f"(or set {where}head_dim), got {heads}")
    pad, vocab = config.get("pad_token_id"), config.get("vocab_size")
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        problems.append(f"{where}pad_token_id must be below {where}vocab_size={vocab}, got {pad}")
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"{where}num_key_value_heads must divide {where}num_attention_heads={heads}, "
                        f"got {kv_heads}")
    return problems


def with_file_shape(model: Any) -> Any:
    """A model read from a file (`model.config_path`, `model.pretrained_path`) as it is built and recorded: `arch`
    is the file's model_type and `config` its other fields, not the preset's or the command line's, which do not
    apply to it (the job's params, results.json and checks then say what ran). Unchanged without a file, or with
    one that cannot be read (validation names the problem)."""
    path = model.pretrained_path or model.config_path
    if path is None:
        return model
    try:
        fields = read_config_file(path)
    except ConfigError:
        return model
    return dataclasses.replace(model, arch=fields.pop("model_type"), config=fields)


EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")  # HF configs' names


def expert_problems(model: Any, mode: str) -> list[str]:
    """mode=predict of a mixture-of-experts model: its meta trace cannot run the expert layers (peft's adapters
    on expert weights open an autocast on the meta device; transformers' grouped matmul has a bf16-only meta
    kernel), so it is refused here instead of failing in the job. `model` is a valid ModelConfig whose `config`
    holds a file's fields where it has one (`with_file_shape`)."""
    if mode != "predict":
        return []
    path = model.pretrained_path or model.config_path
    source = f"{str(config_file(path))}: field " if path is not None else "model.config."
    fields = model.config
    counts = [(key, fields[key]) for key in EXPERT_FIELDS if isinstance(fields.get(key), int) and fields[key] > 1]
    if not counts:
        return []
    key, count = counts[0]
    return [f"mode must be measure for a mixture-of-experts model ({source}{key}={count}), got 'predict': the trace "
            "on meta tensors cannot run expert layers yet"]

