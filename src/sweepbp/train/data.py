"""Token batches: deterministic synthetic sequences, or a local text file tokenized bytewise."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from sweepbp.config import DataConfig

BYTE_VOCAB = 256


class TokenBatches(Dataset):
    """`steps` ready-made batches; batch i depends only on (seed, i), so reruns see the same data."""

    def __init__(self, data: DataConfig, steps: int, size: int, seq_len: int, vocab_size: int, seed: int):
        self.steps, self.size, self.seq_len, self.vocab, self.seed = steps, size, seq_len, vocab_size, seed
        self.corpus = _read_corpus(data) if data.name == "text" else None
        if self.corpus is not None and vocab_size < BYTE_VOCAB:
            raise ValueError(f"data=text needs model.config.vocab_size >= {BYTE_VOCAB}, got {vocab_size}")

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.corpus is None:
            tokens = _counting_sequences(generator, self.size, self.seq_len, self.vocab)
        else:
            tokens = _text_windows(generator, self.corpus, self.size, self.seq_len)
        return {"input_ids": tokens, "labels": tokens.clone()}


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
