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


def test_the_batch_auto_chose_is_said_before_the_steps(monkeypatch, capsys):
    from conftest import FAST

    from sweepbp.job import run_job

    monkeypatch.setenv("CI", "1")  # quiet: the one line is said all the same
    run = compose([*FAST, "tracking=none", "batch.size=auto", "budget_gb=0.01"])
    result = run_job(run, progress=ProgressLine("0/1", run))
    assert result.status == "ok", result.error
    chosen = int(result.metrics["auto_batch_size"])
    assert (f"[sweepbp] job 0/1 | batch.size=auto chose {chosen}, the largest predicted to fit budget_gb=0.01 on cpu"
            in capsys.readouterr().err.splitlines())


def test_auto_sized_to_more_than_this_machines_memory_is_a_note():
    import os

    import pytest

    from sweepbp.cli.precheck import local_cuda_gpus, precheck
    from sweepbp.config import register_schemas

    if local_cuda_gpus() != 0:
        pytest.skip("the note is for jobs measured on a CPU")
    register_schemas()
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    said: list[str] = []
    problems, _ = precheck(["batch.size=auto", f"budget_gb={2 * host_gb:.0f}", "tracking=none"], notes=said)
    assert problems == [] and len(said) == 1 and said[0].startswith(f"budget_gb={2 * host_gb:.0f} is more than this")
    said.clear()
    precheck(["batch.size=auto", f"budget_gb={2 * host_gb:.0f}", "mode=predict", "tracking=none"], notes=said)
    precheck(["batch.size=auto", f"budget_gb={host_gb / 4:.0f}", "tracking=none"], notes=said)
    assert said == []  # a prediction allocates nothing; a budget within the machine's memory is fine
