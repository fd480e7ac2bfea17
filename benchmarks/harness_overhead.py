"""Does the harness slow down what it measures? sweepbp's job recipe vs a plain PyTorch loop (issue #3, item 8).

    PYTHONPATH=src python benchmarks/harness_overhead.py [--rounds 4] [override ...]

The same tiny-model workload (same model, adapter, batches, optimizer and number of steps) runs in this
one process, alternating: sweepbp's own `run_job` (Lightning Trainer, LoraFinetune with its phase timers
and gradient hooks, the memory-traced step, the progress callback), then a hand-written loop
(forward, backward, AdamW step, zero_grad, read the loss). Each side's per-step wall time is the interval
between the ends of consecutive steps, so it contains everything the loop does per step (fetching the
batch, Lightning's bookkeeping, hooks), read with the same clock for both. Only the steps sweepbp times
are compared (after the warm-up and the traced step). Prints the throughput ratio sweepbp / plain loop
(goal >= 0.98) over all steps, the median of the per-round (paired) ratios, and the ratio of sweepbp's
*reported* tokens_per_s to the plain loop's.

On a 2-core machine two torch threads share the cores with the interpreter and whatever else runs, and
whole runs land in a fast or a slow mode (+-15 %), which hides a 2 % effect; `--threads 1` measures the
harness with that noise mostly gone (docs/performance.md has both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

DEFAULT = ["tracking=none", "trainer.steps=24", "trainer.warmup_steps=2"]


def compose(overrides: list[str]):
    from sweepbp.cli.precheck import check_job_config
    from sweepbp.config import register_schemas

    register_schemas()
    problems, run = check_job_config(overrides)
    if run is None:
        raise SystemExit("; ".join(problems))
    return run


class StepEnds:
    """The progress callback sweepbp calls after every step: records when each step ended."""

    def __init__(self):
        self.ends: list[float] = []

    def __call__(self, step: int, loss: float, step_time: float, tokens: int) -> None:
        self.ends.append(time.perf_counter())


def through_sweepbp(run) -> tuple[list[float], float]:
    """Per-step wall times of the timed steps, and the tokens_per_s sweepbp reports."""
    from sweepbp.job import run_job

    ends = StepEnds()
    result = run_job(run, progress=ends)
    if result.status != "ok":
        raise SystemExit(f"sweepbp job {result.status}: {result.error}")
    return _timed_intervals(ends.ends, run), result.metrics["tokens_per_s"]


def lightning_gaps(run) -> list[float]:
    """Seconds Lightning's loop spends between two timed `training_step` calls (one extra sweepbp run, with
    the step wrapped to note when it is entered and left; not part of the compared rounds)."""
    from sweepbp.train.module import LoraFinetune

    entered, left = [], []
    step = LoraFinetune.training_step

    def noted(self, batch, batch_idx):
        entered.append(time.perf_counter())
        try:
            return step(self, batch, batch_idx)
        finally:
            left.append(time.perf_counter())

    LoraFinetune.training_step = noted
    try:
        through_sweepbp(run)
    finally:
        LoraFinetune.training_step = step
    first_timed = run.cfg.trainer.warmup_steps + 1
    return [entered[i] - left[i - 1] for i in range(first_timed + 1, len(entered))]


def plain_loop(run) -> list[float]:
    """The same steps in a hand-written loop; per-step wall times of the steps sweepbp would time."""
    import torch

    from sweepbp.train.environment import pick_device
    from sweepbp.memory import apply_memory_strategy
    from sweepbp.train.data import TokenBatches
    from sweepbp.train.lora import apply_lora
    from sweepbp.train.model import build_model

    cfg = run.cfg
    device = pick_device(cfg.trainer.accelerator)
    model = apply_lora(build_model(cfg.model, device, cfg.trainer.seed), cfg.lora)
    apply_memory_strategy(model, cfg.memory, device)
    model.train()
    batches = TokenBatches(cfg.data, cfg.trainer.steps, int(cfg.batch.size), cfg.batch.seq_len,
                           model.config.vocab_size, cfg.trainer.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.trainer.lr,
                                  weight_decay=cfg.trainer.weight_decay)
    ends = []
    for index in range(len(batches)):
        batch = {k: v.to(device) for k, v in batches[index].items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # any loop reads its loss; on a GPU this also waits for the step
        ends.append(time.perf_counter())
    return _timed_intervals(ends, run)


def _timed_intervals(ends: list[float], run) -> list[float]:
    """Durations of the steps sweepbp times: after warm-up and the traced step (index warmup_steps)."""
    first_timed = run.cfg.trainer.warmup_steps + 1
    return [ends[i] - ends[i - 1] for i in range(first_timed, len(ends))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (each: sweepbp, then plain loop)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("overrides", nargs="*", help="sweepbp overrides on top of " + " ".join(DEFAULT))
    args = parser.parse_args()
    run = compose([*DEFAULT, *args.overrides])
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokens = int(run.cfg.batch.size) * run.cfg.batch.seq_len
    print(f"# {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; "
          f"{tokens} tokens/step, {run.cfg.trainer.steps} steps, overrides: {' '.join([*DEFAULT, *args.overrides])}")
    harness, plain, reported, paired = [], [], [], []
    plain_loop(run)  # both sides then start with warm library caches
    for number in range(args.rounds):
        h, tokens_per_s = through_sweepbp(run)
        p = plain_loop(run)
        harness += h
        plain += p
        reported.append(tokens_per_s)
        paired.append(statistics.median(p) / statistics.median(h))
        print(f"round {number + 1}: sweepbp {statistics.median(h) * 1e3:8.2f} ms/step   plain {statistics.median(p) * 1e3:8.2f} ms/step"
              f"   ratio {statistics.median(p) / statistics.median(h):.3f}")
    harness_step, plain_step = statistics.median(harness), statistics.median(plain)
    print(f"sweepbp       {tokens / harness_step:10.1f} tokens/s  (median step {harness_step * 1e3:.2f} ms over {len(harness)} steps)")
    print(f"plain loop    {tokens / plain_step:10.1f} tokens/s  (median step {plain_step * 1e3:.2f} ms over {len(plain)} steps)")
    print(f"throughput ratio sweepbp / plain loop: {plain_step / harness_step:.3f}   (goal >= 0.98)")
    print(f"median of the {len(paired)} paired round ratios: {statistics.median(paired):.3f}"
          f"   (min {min(paired):.3f}, max {max(paired):.3f})")
    print(f"reported ratio (sweepbp's tokens_per_s / plain loop): {statistics.median(reported) / (tokens / plain_step):.3f}")
    print(f"Lightning's loop between two timed steps: {statistics.median(lightning_gaps(run)) * 1e3:.3f} ms (median)")
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
