"""The live progress line: its rate comes from the tokens of the timed steps' batches."""

from __future__ import annotations

from conftest import compose

from sweepbp.sweep.progress import ProgressLine


def test_rate_counts_the_batches_tokens_also_when_the_batch_size_is_auto(monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("SWEEPBP_QUIET", "0")
    line = ProgressLine("0/1", compose(["batch.size=auto", "budget_gb=1", "trainer.steps=3", "trainer.warmup_steps=1"]))
    line(0, 2.0, 0.0, 512)   # warm-up: untimed, not counted
    line(1, 1.9, 0.5, 512)
    line(2, 1.8, 0.25, 256)  # last step: the line is printed
    assert capsys.readouterr().err.strip().endswith("step 3/3 | loss 1.8000 | 1,024 tokens/s")  # 768 / 0.75 s
