"""Token batches: deterministic synthetic sequences or a local text file tokenized bytewise (one full-length
row per sequence, `TokenBatches`), or a local dataset of examples padded or packed (`DatasetBatches`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from sweepbp.config import DATASETS, DataConfig, DatasetConfig, SweepbpConfig
from sweepbp.train.batching import Plan, make_plan, step_tensors
from sweepbp.train.dataset import BYTE_VOCAB, Tokenized, length_metrics, tokenize_dataset


def token_batches(cfg: SweepbpConfig, vocab_size: int, seed: int) -> TokenBatches | DatasetBatches:
    """The batches of a job: `steps` optimizer steps of `cfg.data` at `cfg.batch`'s shape."""
    if cfg.data.name in DATASETS:
        assert isinstance(cfg.data, DatasetConfig)
        return DatasetBatches(cfg, int(cfg.batch.size), vocab_size)
    return TokenBatches(cfg.data, cfg.trainer.steps, int(cfg.batch.size), cfg.batch.seq_len, vocab_size, seed,
                        cfg.batch.accumulate)


class TokenBatches(Dataset):
    """`steps` ready-made batches; batch i depends only on (seed, i), so reruns see the same data."""

    def __init__(self, data: DataConfig, steps: int, size: int, seq_len: int, vocab_size: int, seed: int,
                 accumulate: int = 1):
        self.steps, self.size, self.seq_len, self.vocab, self.seed = steps, size, seq_len, vocab_size, seed
        self.accumulate = accumulate
        self.corpus = _read_corpus(data) if data.name == "text" else None
        if self.corpus is not None and vocab_size < BYTE_VOCAB:
            raise ValueError(f"data=text needs model.config.vocab_size >= {BYTE_VOCAB}, got {vocab_size}")

    def __len__(self) -> int:
        return self.steps

    def inference_batch(self) -> dict[str, torch.Tensor]:
        """What the inference pass runs on: the first step's first micro-batch."""
        return first_micro_batch(self[0])

    def metrics(self) -> dict[str, float]:
        return {}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One optimizer step's tokens: (size, seq_len), or (accumulate, size, seq_len) micro-batches."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rows = self.size * self.accumulate
        if self.corpus is None:
            tokens = _counting_sequences(generator, rows, self.seq_len, self.vocab)
        else:
            tokens = _text_windows(generator, self.corpus, rows, self.seq_len)
        if self.accumulate > 1:
            tokens = tokens.reshape(self.accumulate, self.size, self.seq_len)
        return {"input_ids": tokens, "labels": tokens.clone()}


class DatasetBatches(Dataset):
    """The job's `trainer.steps` batches of a dataset, in the plan's order: warm-up steps, the epoch's worst
    step (traced), timed steps spread over the epoch (train/batching.py)."""

    def __init__(self, cfg: SweepbpConfig, size: int, vocab_size: int):
        self.data, self.plan = dataset_plan(cfg, size, vocab_size)
        self.seq_len, self.accumulate = cfg.batch.seq_len, cfg.batch.accumulate

    def __len__(self) -> int:
        return len(self.plan.order)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        step = self.plan.epoch[self.plan.order[index]]
        return step_tensors(step, self.data.pad_id, self.plan.masked, self.accumulate)

    def inference_batch(self) -> dict[str, torch.Tensor]:
        """What the inference pass runs on: the traced step's largest micro-batch."""
        return largest_micro_batch(step_tensors(self.plan.traced, self.data.pad_id, self.plan.masked, self.accumulate))

    def metrics(self) -> dict[str, float]:
        return dataset_metrics(self.data, self.plan, self.seq_len)


def dataset_plan(cfg: SweepbpConfig, size: int, vocab_size: int) -> tuple[Tokenized, Plan]:
    """A dataset job's examples and its plan at batch size `size` (mode=predict plans the same)."""
    assert isinstance(cfg.data, DatasetConfig)
    tokenized = tokenized_for(cfg.data, cfg.model.pretrained_path, vocab_size)
    plan = make_plan(tokenized.examples, cfg.data, size, cfg.batch.seq_len, cfg.batch.accumulate, cfg.trainer.seed,
                     cfg.trainer.steps, cfg.trainer.warmup_steps)
    return tokenized, plan


def dataset_metrics(tokenized: Tokenized, plan: Plan, seq_len: int) -> dict[str, float]:
    """The data's length distribution, the epoch's length and its worst step (the traced one)."""
    return {**length_metrics(tokenized.examples, seq_len), "epoch_steps": float(len(plan.epoch)),
            "worst_batch_tokens": float(sum(m.tokens for m in plan.traced)),
            "worst_batch_seq_len": float(max(m.width for m in plan.traced))}


def tokenized_for(data: DatasetConfig, pretrained_path: str | None, vocab_size: int) -> Tokenized:
    """The dataset tokenized, checked against the model's vocabulary."""
    tokenized = tokenize_dataset(data, pretrained_path)
    if tokenized.vocab > vocab_size:
        what = "bytewise: no tokenizer" if tokenized.tokenizer == "bytewise" else f"the tokenizer in {tokenized.tokenizer!r}"
        raise ValueError(f"data={data.name} is tokenized into {tokenized.vocab} ids ({what}): model.config.vocab_size "
                         f"must be at least that, got {vocab_size}")
    return tokenized


def micro_batches(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of one optimizer step's batch (views, no copies): one unless it accumulates (a
    dataset's micro-batches come as a list, each padded to its own width)."""
    if isinstance(batch, list):
        return batch
    if batch["input_ids"].dim() == 2:
        return [batch]
    return [{key: value[i] for key, value in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _counting_sequences(generator: torch.Generator, size: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Each row counts up from a random start (mod vocab): next-token prediction a model can learn."""
    starts = torch.randint(0, vocab, (size, 1), generator=generator)
    return (starts + torch.arange(seq_len)) % vocab


def _read_corpus(data: DataConfig) -> torch.Tensor:
    raw = Path(data.path).expanduser().read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def _text_windows(generator: torch.Generator, corpus: torch.Tensor, size: int, seq_len: int) -> torch.Tensor:
    if corpus.numel() <= seq_len:
        repeats = seq_len // max(corpus.numel(), 1) + 2
        corpus = corpus.repeat(repeats)
    starts = torch.randint(0, corpus.numel() - seq_len, (size,), generator=generator)
    return torch.stack([corpus[s:s + seq_len] for s in starts.tolist()])


def largest_micro_batch(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The micro-batch with the most positions (the first of equals): a dataset step's micro-batches differ."""
    if isinstance(batch, list):
        return max(batch, key=lambda part: part["input_ids"].numel())
    return first_micro_batch(batch)


def token_counts(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> tuple[int, int, int]:
    """(real tokens, positions, rows) of one optimizer step's batch: padding is where attention_mask is 0."""
    parts = micro_batches(batch)
    positions = sum(part["input_ids"].numel() for part in parts)
    real = sum(int(part["attention_mask"].sum()) if "attention_mask" in part else part["input_ids"].numel()
               for part in parts)
    return real, positions, sum(part["input_ids"].shape[0] for part in parts)


def first_micro_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first micro-batch on storages of its own (the inference pass runs on one micro-batch, and a view
    would keep the whole step's tokens in its storage)."""
    if batch["input_ids"].dim() == 2:
        return batch
    return {key: value[0].clone() for key, value in batch.items()}
