"""Time to first result and per-job cost of sweepbp, on the default tiny model (issue #10).

    PYTHONPATH=src python benchmarks/startup.py [--repeat N]

Prints, measured in a fresh temporary folder with the real command line in subprocesses:
  1. wall time of `python -m sweepbp --help`, and of a config error (median of 3 each);
  2. wall time of `python -m sweepbp` from start until its results.json exists (a fresh folder, so it
     includes creating the MLflow store), and again in the same folder (the store exists);
  3. wall time of the 8-job sweep `-m lora.r=4,8 memory=none,ckpt batch.size=2,4`, divided by 8;
  4. the time inside its training steps, from the jobs' own records (`steps_time_s`: every step,
     warm-up and memory-traced included; `train_time_s`: the timed steps only), so that
     per-job overhead = sweep wall / 8 - steps_time_s;
and the cost of recording one job in MLflow (a fresh SQLite store, the 8 jobs' real results).
Not a test: the figures depend on the machine and on what else runs on it (the load is printed). On a
shared machine other processes slow some runs down many times over; `--repeat N` runs the single job and
the sweep N times each and keeps the fastest run (the one least disturbed), as start-up benchmarks do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["-m", "lora.r=4,8", "memory=none,ckpt", "batch.size=2,4"]


def sweepbp(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Run `python -m sweepbp ARGS` in `cwd`; its wall time in seconds and the finished process."""
    env = {**os.environ, "CI": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sweepbp", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def median_wall(args: list[str], cwd: Path, expect: int, runs: int = 3) -> float:
    walls = []
    for _ in range(runs):
        wall, done = sweepbp(args, cwd)
        if done.returncode != expect:
            raise SystemExit(f"`sweepbp {' '.join(args)}` exited {done.returncode}:\n{done.stderr[-2000:]}")
        walls.append(wall)
    return statistics.median(walls)


def single_job(cwd: Path) -> float:
    """Seconds from launching `python -m sweepbp` until its results.json is written."""
    started = time.time()
    _, done = sweepbp([], cwd)
    if done.returncode != 0:
        raise SystemExit(f"`sweepbp` failed:\n{done.stderr[-2000:]}")
    newest = max(cwd.glob("outputs/*/*/results.json"), key=lambda p: p.stat().st_mtime)
    return newest.stat().st_mtime - started


def sweep_records(cwd: Path) -> tuple[list[dict], list[float]]:
    """The sweep's job records in job order, and when each results.json was written (epoch seconds)."""
    folder = max(cwd.glob("multirun/*/*"), key=lambda p: p.stat().st_mtime)
    paths = sorted(folder.glob("*/results.json"), key=lambda p: int(p.parent.name))
    return [json.loads(p.read_text()) for p in paths], [p.stat().st_mtime for p in paths]


def decompose(started: float, records: list[dict], written: list[float]) -> tuple[float, float]:
    """Where the overhead sits: seconds before the first job's own work (start-up, paid once), and the mean
    seconds between consecutive jobs beyond the job's own time (composition, records, process start)."""
    jobs = [r["metrics"]["job_time_s"] for r in records]
    start_up = written[0] - started - jobs[0]
    gaps = [written[i] - written[i - 1] - jobs[i] for i in range(1, len(jobs))]
    return start_up, statistics.mean(gaps)


def tracking_cost(records: list[dict], folder: Path) -> dict[str, float]:
    """Seconds to open a fresh store, and per job to start and to finish its MLflow run (median)."""
    start = time.perf_counter()
    import mlflow  # noqa: F401

    figures = {"import_mlflow_s": time.perf_counter() - start}
    from sweepbp.config import TrackingConfig
    from sweepbp.result import JobResult
    from sweepbp.tracking.mlflow_store import MlflowStore

    tracking = TrackingConfig(uri=f"sqlite:///{folder / 'mlflow.db'}", experiment="bench")
    start = time.perf_counter()
    recorder = MlflowStore(tracking)
    recorder.experiment_id()  # the schema and the experiment, as a sweep's first job creates them
    figures["create_store_s"] = time.perf_counter() - start
    parent = recorder.open_sweep("bench", folder / "sweep")
    starts, finishes = [], []
    for number, record in enumerate(records):
        result = JobResult(**record)
        job_dir = folder / str(number)
        files = [result.write(job_dir), job_dir / "config.yaml"]
        files[1].write_text("from: benchmark\n")
        start = time.perf_counter()
        run_id = recorder.open_job(result, f"job {number}", parent, {"sweepbp.job_num": str(number)})
        starts.append(time.perf_counter() - start)
        start = time.perf_counter()
        recorder.finish_job(run_id, result, files)
        finishes.append(time.perf_counter() - start)
    figures["start_job_s"] = statistics.median(starts)
    figures["finish_job_s"] = statistics.median(finishes)
    return figures


def mean(records: list[dict], key: str) -> float:
    return statistics.mean(r["metrics"][key] for r in records)


def fastest_sweep(cwd: Path, repeat: int) -> tuple[float, list[dict], list[float], float]:
    """The least disturbed of `repeat` runs of the 8-job sweep: its wall time, records, write times, start."""
    best = None
    for _ in range(repeat):
        started = time.time()
        wall, done = sweepbp(SWEEP, cwd)
        if done.returncode != 0:
            raise SystemExit(f"sweep failed:\n{done.stderr[-3000:]}")
        if best is None or wall < best[0]:
            best = (wall, *sweep_records(cwd), started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description="sweepbp start-up benchmark (issue #10)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the single job and of the sweep; the fastest counts")
    args = parser.parse_args()
    print(f"# sweepbp start-up benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="sweepbp-bench-") as tmp:
        cwd = Path(tmp)
        help_s = median_wall(["--help"], cwd, expect=0)
        error_s = median_wall(["lora.r=0"], cwd, expect=2)
        first_s = single_job(cwd)
        again_s = min(single_job(cwd) for _ in range(args.repeat))
        sweep_wall, records, written, started = fastest_sweep(cwd, args.repeat)
        start_up, between = decompose(started, records, written)
        assert len(records) == 8 and all(r["status"] == "ok" for r in records), [r["status"] for r in records]
        per_job = sweep_wall / len(records)
        steps, timed = mean(records, "steps_time_s"), mean(records, "train_time_s")
        setup, job = mean(records, "setup_time_s"), mean(records, "job_time_s")
        tracking = tracking_cost(records, cwd / "tracking-bench")
    print(f"help_wall_s              {help_s:7.2f}   python -m sweepbp --help (median of 3; target < 2)")
    print(f"config_error_wall_s      {error_s:7.2f}   python -m sweepbp lora.r=0 (median of 3; target < 2)")
    print(f"first_result_s           {first_s:7.2f}   python -m sweepbp -> results.json, fresh folder: creates the MLflow store (target < 20)")
    print(f"first_result_again_s     {again_s:7.2f}   the same, store already there (fastest of {args.repeat})")
    print(f"sweep_wall_per_job_s     {per_job:7.2f}   ({sweep_wall:.1f} s for python -m sweepbp {' '.join(SWEEP)}) / 8, fastest of {args.repeat}")
    print(f"steps_time_s             {steps:7.2f}   inside all training steps per job (warm-up, traced, timed), mean of 8")
    print(f"  train_time_s           {timed:7.2f}   of which the timed steps")
    print(f"  setup_time_s           {setup:7.2f}   prediction + model build + adapter + memory strategy per job")
    print(f"  job_time_s             {job:7.2f}   whole job inside its process (setup, inference peak, Trainer, steps)")
    print(f"per_job_overhead_s       {per_job - steps:7.2f}   sweep wall / 8 - steps_time_s (target < 2), made of:")
    print(f"  start_up_s             {start_up:7.2f}   once: launch until the first job's own work is done, minus its job_time_s")
    print(f"  between_jobs_s         {between:7.2f}   per job: results.json to results.json, minus the job's job_time_s")
    print(f"  in_job_s               {job - steps:7.2f}   per job: job_time_s - steps_time_s (build, inference peak, Trainer)")
    print(f"mlflow_import_s          {tracking['import_mlflow_s']:7.2f}   once per sweep process")
    print(f"mlflow_create_store_s    {tracking['create_store_s']:7.2f}   once per store (schema creation)")
    print(f"mlflow_start_job_s       {tracking['start_job_s']:7.3f}   per job: create run + params (median)")
    print(f"mlflow_finish_job_s      {tracking['finish_job_s']:7.3f}   per job: metrics + tags + 2 artifacts + status (median)")
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
