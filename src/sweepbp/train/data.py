"""Token batches: deterministic synthetic sequences, or a local text file tokenized bytewise."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from sweepbp.config import DataConfig

BYTE_VOCAB = 256


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


def micro_batches(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of one optimizer step's batch (views, no copies): one unless it accumulates."""
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


def first_micro_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first micro-batch on storages of its own (the inference pass runs on one micro-batch, and a view
    would keep the whole step's tokens in its storage)."""
    if batch["input_ids"].dim() == 2:
        return batch
    return {key: value[0].clone() for key, value in batch.items()}
