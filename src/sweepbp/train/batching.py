"""A dataset's examples as the job's batches: rows padded or packed, one epoch of optimizer steps, and the
order the job runs them in, the epoch's worst step traced.

Rows (`data.packing`):
  padding  one example per row, truncated at batch.seq_len, right-padded to the micro-batch's longest row
           (`data.pad_to=longest`) or to batch.seq_len (`max_length`). Padding positions have label -100
           and attention_mask 0: they cost compute and memory, never loss. The mask is passed with every
           padded batch, as a padding collator does: transformers then builds a (batch, 1, seq, seq) mask
           for SDPA when some row is padded (which moves SDPA off its causal kernel and makes grouped-query
           models repeat K/V), and none when no row is.
  packing  the examples (each ending in EOS) joined into one stream in the epoch's order and cut into
           batch.seq_len rows; the stream's last partial row is dropped. No padding and no mask: attention
           is causal over the whole row, so a token also sees the earlier examples of its row (no
           per-document position ids; the cost of that shortcut is the cross-example attention, not memory).
Order (`data.order`): shuffle (seeded by trainer.seed) or longest_first (sorted by length, longest first:
batches of similar lengths, the longest batch first). Micro-batches of batch.size rows (the epoch's last may
hold fewer), optimizer steps of batch.accumulate micro-batches, each micro-batch padded on its own.

The job's steps (`Plan.order`): the warm-up steps take the epoch's first steps; the traced step is the epoch's
worst one, the step whose largest micro-batch has the most positions (then the most positions in all, then
the most real tokens), so peak_memory_bytes is what the whole epoch needs; the timed steps are spread evenly
over the rest of the epoch (the middle step of equal strata), so their real-token throughput stands for the
epoch's. An epoch shorter than the job repeats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sweepbp.config import DatasetConfig
from sweepbp.train.loss import IGNORE


@dataclass(frozen=True)
class MicroBatch:
    """Rows of token ids (unpadded) and the width every row is padded to."""

    rows: tuple[tuple[int, ...], ...]
    width: int

    @property
    def positions(self) -> int:
        return len(self.rows) * self.width

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.rows)

    @property
    def padded(self) -> bool:
        return any(len(row) < self.width for row in self.rows)


Step = tuple[MicroBatch, ...]


@dataclass(frozen=True)
class Plan:
    """One epoch of optimizer steps, its worst step, and the epoch steps the job runs, in order."""

    epoch: tuple[Step, ...]
    worst: int  # index in `epoch` of the traced step
    order: tuple[int, ...]  # epoch index of each of the job's steps
    masked: bool  # rows are padded and carry an attention_mask (not packed)

    @property
    def traced(self) -> Step:
        return self.epoch[self.worst]


def make_plan(examples: tuple[tuple[int, ...], ...], data: DatasetConfig, size: int, seq_len: int, accumulate: int,
              seed: int, steps: int, warmup_steps: int) -> Plan:
    """The plan of a job over `examples` (token ids); ValueError when the data cannot fill one row."""
    if not examples:
        raise ValueError(f"data.path {data.path!r} holds no non-empty example in data.text_field={data.text_field!r}")
    ordered = _ordered(examples, data.order, seed)
    if data.packing:
        rows = _packed_rows(ordered, seq_len)
        if not rows:
            total = sum(len(x) for x in examples)
            raise ValueError(f"data.packing=true needs at least batch.seq_len={seq_len} tokens, data.path holds {total}")
    else:
        rows = [x[:seq_len] for x in ordered]
    micro = [_micro_batch(rows[i:i + size], seq_len, data) for i in range(0, len(rows), size)]
    epoch = tuple(tuple(micro[i:i + accumulate]) for i in range(0, len(micro), accumulate))
    worst = max(range(len(epoch)), key=lambda i: _heaviness(epoch[i]))  # the first of equals
    return Plan(epoch, worst, _job_order(len(epoch), worst, steps, warmup_steps), masked=not data.packing)


def _ordered(examples: tuple[tuple[int, ...], ...], order: str, seed: int) -> list[tuple[int, ...]]:
    if order == "longest_first":
        return sorted(examples, key=len, reverse=True)  # stable: equal lengths keep the file's order
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def _packed_rows(ordered: list[tuple[int, ...]], seq_len: int) -> list[tuple[int, ...]]:
    stream = [token for example in ordered for token in example]
    return [tuple(stream[i:i + seq_len]) for i in range(0, len(stream) - seq_len + 1, seq_len)]


def _micro_batch(rows: list[tuple[int, ...]], seq_len: int, data: DatasetConfig) -> MicroBatch:
    longest = max(len(row) for row in rows)
    return MicroBatch(tuple(rows), seq_len if data.packing or data.pad_to == "max_length" else longest)


def _heaviness(step: Step) -> tuple[int, int, int]:
    return (max(m.positions for m in step), sum(m.positions for m in step), sum(m.tokens for m in step))


def _job_order(epoch_steps: int, worst: int, steps: int, warmup_steps: int) -> tuple[int, ...]:
    rest = [i for i in range(epoch_steps) if i != worst] or [worst]
    warm = [rest[i % len(rest)] for i in range(warmup_steps)]
    timed = steps - warmup_steps - 1
    spread = [rest[(2 * i + 1) * len(rest) // (2 * timed)] for i in range(timed)]
    return (*warm, worst, *spread)


def step_tensors(step: Step, pad_id: int, masked: bool, accumulate: int) -> dict | list[dict]:
    """An optimizer step's batch: one micro-batch's tensors, or (batch.accumulate > 1) a list of them."""
    parts = [micro_batch_tensors(m, pad_id, masked) for m in step]
    return parts if accumulate > 1 else parts[0]


def micro_batch_tensors(micro: MicroBatch, pad_id: int, masked: bool) -> dict[str, torch.Tensor]:
    """input_ids, labels (-100 at padding) and, for padded rows, attention_mask (0 at padding): int64, right-padded."""
    shape = (len(micro.rows), micro.width)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(micro.rows):
        ids = torch.tensor(row, dtype=torch.long)
        tokens[i, :len(row)], labels[i, :len(row)], mask[i, :len(row)] = ids, ids, 1
    batch = {"input_ids": tokens, "labels": labels}
    if masked:
        batch["attention_mask"] = mask
    return batch
