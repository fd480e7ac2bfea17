"""Is `timing_noisy` right? The same job, on the machine as it is and under artificial load (issue #23, item 6).

    PYTHONPATH=src python benchmarks/timing_noise.py [--rounds 3] [--loaders 4] [override ...]

Each round runs the same job twice in this process (sweepbp's own `run_job`, as the sweep's job process
does): once as the machine is, once while `--loaders` processes (default: twice the CPUs) load the CPUs in
bursts (busy 20-200 ms, idle 0-200 ms, at random: what other jobs, a compiler or a notebook do). Prints each
run's step-time IQR as a fraction of the median, its `timing_noisy` flag (over metrics.NOISY_IQR_FRACTION),
its tokens/s and the 1-minute load around it, then how often each side was flagged. The claim: loaded runs
are flagged, runs on a quiet machine are not. A machine that is not quiet without the test's load (shared,
as this project's 2-core VMs are) shows it in the load column, and then its own runs may be flagged too:
that is the flag doing its job.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time

from harness_overhead import compose  # the same composition (benchmarks/ is on the path of a script run from it)

DEFAULT = ["tracking=none", "trainer.steps=14", "trainer.warmup_steps=2", "batch.size=4", "batch.seq_len=128"]


def burst(seed: int, stop) -> None:
    """Load one CPU in bursts until `stop` is set."""
    rng = random.Random(seed)
    while not stop.is_set():
        until = time.perf_counter() + rng.uniform(0.02, 0.2)
        while time.perf_counter() < until:
            pass
        time.sleep(rng.uniform(0.0, 0.2))


def one_run(run, loaders: int) -> dict[str, float]:
    """The job's figures, with `loaders` burst processes running (none: the machine as it is)."""
    from sweepbp.job import run_job

    context = mp.get_context("spawn")  # the loaders must not inherit torch's thread pool (fork after torch)
    stop = context.Event()
    procs = [context.Process(target=burst, args=(seed, stop), daemon=True) for seed in range(loaders)]
    for proc in procs:
        proc.start()
    try:
        result = run_job(run)
    finally:
        stop.set()
        for proc in procs:
            proc.join()
    if result.status != "ok":
        raise SystemExit(f"job {result.status}: {result.error}")
    return result.metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loaders", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run = compose([*DEFAULT, *args.overrides])
    from sweepbp.metrics import NOISY_IQR_FRACTION

    print(f"job: {' '.join([*DEFAULT, *args.overrides])}; noisy above IQR/median {NOISY_IQR_FRACTION:.0%}; "
          f"{os.cpu_count()} CPUs; loaded = {args.loaders} burst processes")
    print("| round | machine | IQR / median | timing_noisy | tokens/s | load 1m start -> end |")
    print("|---|---|---|---|---|---|")
    flagged = {"as it is": 0, "loaded": 0}
    for number in range(args.rounds):
        for side, loaders in (("as it is", 0), ("loaded", args.loaders)):
            m = one_run(run, loaders)
            flagged[side] += int(m["timing_noisy"])
            print(f"| {number} | {side} | {m['step_time_iqr_s'] / m['step_time_s']:.0%} | {m['timing_noisy']:.0f} | "
                  f"{m['tokens_per_s']:,.0f} | {m['load_1m_start']:.1f} -> {m['load_1m_end']:.1f} |", flush=True)
    print(f"\nflagged timing_noisy: as it is {flagged['as it is']}/{args.rounds}, "
          f"loaded {flagged['loaded']}/{args.rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
