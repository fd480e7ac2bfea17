"""mode=predict's batch: data-less tensors shaped like the batch the job's traced step will get, and
transformers' padding check decided as that batch's data decides it.

Synthetic and text data: one unpadded full-length row per sequence (`data.TokenBatches`). A dataset
(data=jsonl|parquet): the prediction tokenizes it and plans the epoch exactly as the job does
(train/batching.py), so it knows the worst step's micro-batches without running them: their rows, widths,
and which of them hold padding. Their tensors (input_ids, labels and, for padded rows, attention_mask; int64,
as the real ones) have shapes and no data. One check of transformers' mask code reads the mask's values:
`_ignore_causal_mask_sdpa` skips the (batch, 1, seq, seq) mask when no position is padded (SDPA then runs its
causal kernel, and grouped KV heads stay grouped instead of repeated). `padded_rows` answers it from the
plan: each data-less mask carries whether its micro-batch is padded. The CPU equality test
(tests/test_predict.py) is what shows that the prediction follows the real padded batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
from transformers import masking_utils

from sweepbp.config import DATASETS, SweepbpConfig
from sweepbp.train.batching import MicroBatch, Step
from sweepbp.train.data import dataset_metrics, dataset_plan

PADDED = "_sweepbp_padded"  # attribute of a data-less attention_mask: whether its rows hold padding


def empty_batch(size: int, seq_len: int, device: str, accumulate: int = 1) -> dict[str, torch.Tensor]:
    """A batch shaped like `data.TokenBatches` items: input_ids and labels, two int64 storages (with
    accumulation, the step's micro-batches stacked)."""
    shape = (accumulate, size, seq_len) if accumulate > 1 else (size, seq_len)
    tokens = torch.zeros(shape, dtype=torch.long, device=device)
    return {"input_ids": tokens, "labels": tokens.clone()}


@dataclass(frozen=True)
class TracedBatch:
    """What the job's traced step gets at one batch size, planned once per prediction (a dataset is read,
    tokenized and batched once, however many twins are traced)."""

    size: int
    step: Step | None  # a dataset's worst step; None for synthetic and text data (full-length rows)
    masked: bool  # the dataset's batches carry an attention_mask
    metrics: dict[str, float]  # a dataset's length distribution and worst step (empty otherwise)

    def tensors(self, cfg: SweepbpConfig, device: str) -> dict | list:
        """The batch's data-less tensors on `device`."""
        if self.step is None:
            return empty_batch(self.size, cfg.batch.seq_len, device, cfg.batch.accumulate)
        return empty_step(self.step, self.masked, device, cfg.batch.accumulate)


def traced_batch(cfg: SweepbpConfig, size: int, vocab_size: int) -> TracedBatch:
    """The job's traced step at batch size `size`: a dataset's epoch planned as the job plans it."""
    if cfg.data.name not in DATASETS:
        return TracedBatch(size, None, False, {})
    tokenized, plan = dataset_plan(cfg, size, vocab_size)
    return TracedBatch(size, plan.traced, plan.masked, dataset_metrics(tokenized, plan, cfg.batch.seq_len))


def empty_step(step: Step, masked: bool, device: str, accumulate: int) -> dict | list:
    """A dataset step's batch without data, as `batching.step_tensors` lays it out."""
    parts = [_empty_micro_batch(micro, masked, device) for micro in step]
    return parts if accumulate > 1 else parts[0]


def _empty_micro_batch(micro: MicroBatch, masked: bool, device: str) -> dict[str, torch.Tensor]:
    shape = (len(micro.rows), micro.width)
    batch = {name: torch.zeros(shape, dtype=torch.long, device=device) for name in ("input_ids", "labels")}
    if masked:
        mask = torch.zeros(shape, dtype=torch.long, device=device)
        setattr(mask, PADDED, micro.padded)
        batch["attention_mask"] = mask
    return batch


@contextlib.contextmanager
def padded_rows() -> Iterator[None]:
    """transformers' "is any position padded?" answered from the plan for the data-less masks.

    `_preprocess_mask_arguments` turns the batch's mask into a bool copy (the flag is carried over to it);
    `_ignore_causal_mask_sdpa` then decides: with padding, never skip the 4-D mask (right padding is never
    only "future" positions); without, decide as for no mask at all (which is what an all-ones mask gives).
    A mask without the flag (a real tensor) is decided by transformers itself.
    """
    preprocess, ignore = masking_utils._preprocess_mask_arguments, masking_utils._ignore_causal_mask_sdpa

    def flagged_preprocess(*args, **kwargs):
        out = preprocess(*args, **kwargs)
        mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
        if hasattr(mask, PADDED) and isinstance(out[1], torch.Tensor):
            setattr(out[1], PADDED, getattr(mask, PADDED))
        return out

    def decided_ignore(padding_mask, *args, **kwargs):
        if not hasattr(padding_mask, PADDED):
            return ignore(padding_mask, *args, **kwargs)
        return False if getattr(padding_mask, PADDED) else ignore(None, *args, **kwargs)

    with (mock.patch.object(masking_utils, "_preprocess_mask_arguments", flagged_preprocess),
          mock.patch.object(masking_utils, "_ignore_causal_mask_sdpa", decided_ignore)):
        yield
