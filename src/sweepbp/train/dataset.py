"""A local dataset of examples, tokenized: read with Hugging Face `datasets` (local files only), each record's
`data.text_field` rendered (text, or chat messages) and tokenized by the job's tokenizer.

The tokenizer is `data.tokenizer_path`, else the one in `model.pretrained_path`, else none: the UTF-8 bytes
are the ids (0-255, as data=text). Text gets the tokenizer's own special tokens and an EOS at its end, so
packed examples are separated and every padded row ends as in training. A list of {role, content} messages
is rendered by the tokenizer's chat template, which carries its own markers (no EOS added); without a
template (or bytewise) as "role: content" lines, then like text. Empty examples are left out.

Nothing is downloaded: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set before `datasets` is imported, the
tokenizer is loaded with local_files_only, and the Arrow cache `datasets` writes while reading goes to a
temporary folder that is removed afterwards. The result is cached per process (a measured job predicts
first, then trains on the same examples; batch.size=auto predicts several sizes).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import threading
from dataclasses import dataclass

from sweepbp.config.schema import BYTE_VOCAB, DatasetConfig
from sweepbp.datafile import tokenizer_folder

BUILDERS = {"jsonl": "json", "parquet": "parquet"}  # data.name -> `datasets`' packaged builder


@dataclass(frozen=True)
class Tokenized:
    """Every non-empty example's token ids, in file order, and what the batches need of the tokenizer."""

    examples: tuple[tuple[int, ...], ...]
    pad_id: int  # the id written at padding positions (never attended to, never a label)
    vocab: int  # ids the tokenizer can produce: the model's vocabulary must hold them
    tokenizer: str  # the tokenizer folder, or "bytewise"


def tokenize_dataset(data: DatasetConfig, pretrained_path: str | None) -> Tokenized:
    """The dataset of a `data=jsonl|parquet` option, tokenized (cached per file version and tokenizer)."""
    path = os.path.expanduser(str(data.path))
    folder = tokenizer_folder(data.tokenizer_path, pretrained_path)
    return _tokenized(data.name, path, os.stat(path).st_mtime_ns, data.text_field, folder)


@functools.lru_cache(maxsize=4)
def _tokenized(kind: str, path: str, mtime_ns: int, field: str, folder: str | None) -> Tokenized:
    values = read_field(kind, path, field)
    if folder is None:
        texts = [_text(value, field, number, None)[0] for number, value in enumerate(values, 1)]
        ids = [tuple(text.encode("utf-8")) for text in texts]
        return Tokenized(tuple(x for x in ids if x), 0, BYTE_VOCAB, "bytewise")
    tokenizer = load_tokenizer(folder)
    rendered = [_text(value, field, number, tokenizer) for number, value in enumerate(values, 1)]
    ids = _encode(tokenizer, rendered)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Tokenized(tuple(x for x in ids if x), int(pad or 0), len(tokenizer), folder)


def read_field(kind: str, path: str, field: str) -> list:
    """`field` of every record, read by `datasets` from the local file."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets  # the job's process only: a second of imports the command line does not pay
    from tqdm import tqdm

    datasets.disable_progress_bars()
    if not hasattr(tqdm, "_lock"):  # its default lock makes a multiprocessing semaphore, which a job's process
        tqdm.set_lock(threading.RLock())  # (ended by os._exit) would leave behind: a thread lock is enough here
    with tempfile.TemporaryDirectory(prefix="sweepbp-datasets-") as cache:
        table = datasets.load_dataset(BUILDERS[kind], data_files=path, split="train", cache_dir=cache,
                                      keep_in_memory=True)
        if field not in table.column_names:
            raise ValueError(f"data.text_field must be a field of {path!r}'s records "
                             f"({', '.join(table.column_names)}), got {field!r}")
        return list(table[field])


def load_tokenizer(folder: str):
    """The tokenizer of a local folder; a one-line error when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for broken folders
        raise ValueError(f"the tokenizer in {folder!r} could not be loaded: {str(err).splitlines()[0]}") from None


def _text(value: object, field: str, number: int, tokenizer) -> tuple[str, bool]:
    """An example's text, and whether the tokenizer adds its special tokens and an EOS to it (not to a
    chat template's rendering, which carries its own)."""
    if value is None:
        return "", True
    if isinstance(value, str):
        return value, True
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(value, tokenize=False), False
        return "".join(f"{m['role']}: {m['content']}\n" for m in value), True
    raise ValueError(f"data.text_field {field!r} must hold text or a list of {{role, content}} messages; "
                     f"record {number} holds {type(value).__name__}")


def _encode(tokenizer, rendered: list[tuple[str, bool]]) -> list[tuple[int, ...]]:
    """Token ids of every rendered example, tokenized in two batches (with and without special tokens)."""
    ids: list[tuple[int, ...]] = [()] * len(rendered)
    eos = tokenizer.eos_token_id
    for special in (True, False):
        index = [i for i, (text, s) in enumerate(rendered) if s == special and text]
        if not index:
            continue
        encoded = tokenizer([rendered[i][0] for i in index], add_special_tokens=special)["input_ids"]
        for i, row in zip(index, encoded):
            if special and eos is not None and (not row or row[-1] != eos):
                row = [*row, eos]
            ids[i] = tuple(row)
    return ids


def length_metrics(examples: tuple[tuple[int, ...], ...], seq_len: int) -> dict[str, float]:
    """The data's length distribution in tokens (before truncation): what sets the peak and the throughput."""
    lengths = sorted(len(x) for x in examples)
    p95 = statistics.quantiles(lengths, n=20, method="inclusive")[18] if len(lengths) > 1 else lengths[0]
    return {"examples": float(len(lengths)), "example_tokens_mean": statistics.fmean(lengths),
            "example_tokens_p50": float(statistics.median(lengths)), "example_tokens_p95": float(p95),
            "example_tokens_max": float(lengths[-1]),
            "examples_over_seq_len": float(sum(1 for n in lengths if n > seq_len))}
