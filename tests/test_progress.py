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
    assert capsys.readouterr().err.strip().endswith("step 3/3 | loss 1.8000 | 1,024 tokens/s")  # median tokens / median step: 384 / 0.375 s


def test_the_last_line_shows_the_results_tokens_per_s(monkeypatch, capsys):
    """The line and the results use one statistic (the median step): a slow outlier step moves neither."""
    from sweepbp.measure.stats import TimingSummary

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("SWEEPBP_QUIET", "0")
    steps = [0.10, 0.10, 0.40, 0.10]  # one step 4x slower: a mean would show 1,280 tokens/s, the median 2,560
    line = ProgressLine("0/1", compose(["trainer.steps=5", "trainer.warmup_steps=1"]))
    line(0, 2.0, 0.0, 256)
    for step, seconds in enumerate(steps, start=1):
        line(step, 1.0, seconds, 256)
    tokens_per_s = TimingSummary(steps, steps, steps, steps).metrics(256, 2)["tokens_per_s"]
    assert tokens_per_s == 2560
    assert capsys.readouterr().err.strip().endswith(f"| {tokens_per_s:,.0f} tokens/s")
