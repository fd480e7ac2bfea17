"""What snapshot=true costs: the traced step and the prediction with and without it (issue #19).

    PYTHONPATH=src python benchmarks/snapshot_cost.py [--rounds 4] [--threads 1]

Alternating in this one process, `--rounds` times each:
- the tiny model's default job (`python -m sweepbp`: batch 4 x 128, 8 steps, 2 of them warm-up): the wall and
  CPU time of its traced step (between the ends of the step before it and of itself, from the progress
  callback; CPU time is the process's, less moved by other work on a shared machine), the median timed step
  (`step_time_s`, which snapshot=true must not move) and `peak_memory_bytes`;
- the Llama-3.1-8B prediction for a GPU (`mode=predict model=llama3_8b trainer.accelerator=gpu`):
  `predict_time_s` (the trace, with the module hooks and the event log when on).
Both also report `snapshot_time_s` (writing the pickle and the page) and the files' sizes. Prints medians
and the with / without ratios; the peaks must be equal.

Like a sweep's forked job (sweep/worker.py, train/warmup.py), the libraries' objects are frozen out of the
garbage collector's generations, and each job starts collected: otherwise a full collection over them (half
a second here) lands in whichever step happens to trigger it, more often in the one that allocates more.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness_overhead import compose

TINY = ["tracking=none"]
LLAMA = ["tracking=none", "mode=predict", "model=llama3_8b", "trainer.accelerator=gpu"]


class StepEnds:
    """The progress callback sweepbp calls after every step: when each step ended, in wall and CPU time."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def __call__(self, step: int, loss: float, step_time: float, tokens: int) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))


def one_job(overrides: list[str], snapshot: bool, folder: Path) -> dict[str, float]:
    from sweepbp.job import run_job

    run = compose([*overrides, f"snapshot={str(snapshot).lower()}"])
    ends = StepEnds()
    gc.collect()  # the last job's garbage, as a fresh forked job has none
    result = run_job(run, progress=ends, output_dir=folder)
    if result.status != "ok":
        raise SystemExit(f"job {result.status}: {result.error}")
    figures = dict(result.metrics)
    traced = run.cfg.trainer.warmup_steps
    if len(ends.ends) > traced:
        (wall, cpu), (wall_before, cpu_before) = ends.ends[traced], ends.ends[traced - 1]
        figures["traced_step_s"], figures["traced_step_cpu_s"] = wall - wall_before, cpu - cpu_before
    figures["files_bytes"] = float(sum((folder / name).stat().st_size for name in result.artifacts))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import sweepbp.job  # noqa: F401  (imported before the freeze, as in the fork server)

    gc.collect()
    gc.freeze()
    print(f"# {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    rows: dict[tuple[str, bool], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for name, overrides in (("tiny", TINY), ("llama3_8b", LLAMA)):
                for snapshot in (False, True) if index % 2 == 0 else (True, False):
                    folder = Path(tmp) / f"{name}-{snapshot}-{index}"
                    rows.setdefault((name, snapshot), []).append(one_job(overrides, snapshot, folder))
    for name, keys in (("tiny", ("traced_step_s", "traced_step_cpu_s", "step_time_s", "peak_memory_bytes")),
                       ("llama3_8b", ("predict_time_s", "predicted_peak_memory_bytes"))):
        print(f"{name} ({args.rounds} rounds, medians)")
        for key in keys:
            off, on = (statistics.median(r[key] for r in rows[(name, s)]) for s in (False, True))
            print(f"  {key:28s} without {off:16,.4f}  with {on:16,.4f}  ratio {on / off:.3f}")
        on_rows = rows[(name, True)]
        print(f"  {'snapshot_time_s':28s} {statistics.median(r['snapshot_time_s'] for r in on_rows):.4f}")
        print(f"  {'files (pickle + page)':28s} {statistics.median(r['files_bytes'] for r in on_rows) / 1e6:.2f} MB")
        peaks = {r.get("peak_memory_bytes", r.get("predicted_peak_memory_bytes")) for rs in
                 (rows[(name, False)], on_rows) for r in rs}
        print(f"  peaks equal with and without: {len(peaks) == 1}")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
