"""A local dataset file and a tokenizer folder as pre-flight sees them: no torch, `datasets` or transformers.

Config validation refuses here what would fail the job later, in one line naming the key: a missing file,
a first record without `data.text_field`, a tokenizer folder without a readable tokenizer. Only the first
record (JSONL) or the schema (Parquet, via pyarrow) is read; the job reads the whole file with `datasets`
(train/dataset.py). A leaf module: the config's validation calls it, the job asks it where the tokenizer is.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

# Files of a Hugging Face tokenizer folder (fast tokenizer, its config, a sentencepiece model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
KINDS = {"jsonl": "JSONL file (one JSON object per line)", "parquet": "Parquet file"}


def dataset_problems(kind: str, path: str | None, text_field: str, tokenizer_path: str | None) -> list[str]:
    """One line per problem of a `data=jsonl|parquet` option's files."""
    problems = []
    if tokenizer_path is not None:
        reason = tokenizer_problem(tokenizer_path)
        if reason:
            problems.append(f"data.tokenizer_path must be a local folder holding a tokenizer "
                            f"({', '.join(TOKENIZER_FILES)}), got {tokenizer_path!r} ({reason})")
    file = Path(os.path.expanduser(path)) if path else None
    if file is None or not file.is_file():
        return [f"data.path must be an existing local {KINDS[kind]}, got {path!r}", *problems]
    try:
        fields = record_fields(kind, str(file), file.stat().st_mtime_ns)
    except ValueError as err:
        return [f"data.path must be a {KINDS[kind]}, got {path!r} ({err})", *problems]
    if text_field not in fields:
        problems.append(f"data.text_field must be a field of data.path's records ({', '.join(fields)}), "
                        f"got {text_field!r}")
    return problems


@functools.lru_cache(maxsize=8)
def record_fields(kind: str, file: str, mtime_ns: int) -> tuple[str, ...]:
    """The fields of the dataset's records (cached per file version: a sweep validates every job)."""
    if kind == "parquet":
        import pyarrow.parquet  # only for data=parquet (pyarrow comes with `datasets`)

        try:
            return tuple(pyarrow.parquet.read_schema(file).names)
        except (OSError, pyarrow.ArrowException) as err:
            raise ValueError(f"not Parquet: {str(err).splitlines()[0]}") from None
    try:
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    return _fields_of(json.loads(line), number)
    except json.JSONDecodeError as err:
        raise ValueError(f"line {number} is not JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: {err}") from None
    raise ValueError("no records")


def _fields_of(record: object, number: int) -> tuple[str, ...]:
    if not isinstance(record, dict):
        raise ValueError(f"line {number} is not a JSON object")
    return tuple(record)


def tokenizer_problem(folder: str) -> str | None:
    """Why `folder` is no tokenizer folder (None when it is one)."""
    path = Path(os.path.expanduser(folder))
    if not path.is_dir():
        return "no such folder"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return "none of those files in it"
    fast = path / "tokenizer.json"
    if fast.is_file() and not _is_json(str(fast), fast.stat().st_mtime_ns):
        return "tokenizer.json is not JSON"
    return None


@functools.lru_cache(maxsize=8)
def _is_json(file: str, mtime_ns: int) -> bool:
    try:
        with open(file, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def tokenizer_folder(tokenizer_path: str | None, pretrained_path: str | None) -> str | None:
    """The tokenizer a dataset is tokenized with: `data.tokenizer_path`, else the model's own folder when it
    holds a tokenizer, else None (bytewise, as data=text)."""
    if tokenizer_path is not None:
        return os.path.expanduser(tokenizer_path)
    if pretrained_path is not None:
        folder = Path(os.path.expanduser(pretrained_path))
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return str(folder)
    return None
