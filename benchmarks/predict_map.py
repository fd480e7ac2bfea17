"""How long a memory map takes: the 12-configuration Llama-3.1-8B prediction sweep and one 70B prediction
(issue #17), for this tree and, optionally, another checkout of sweepbp in alternating rounds.

    python benchmarks/predict_map.py [--rounds N] [--before PATH_TO_OTHER_CHECKOUT | --processes A,B]

Each round runs, with the real command line in a fresh temporary folder:
  1. `python -m sweepbp -m mode=predict model=llama3_8b memory=none,ckpt batch.size=1,2,4
     batch.seq_len=2048,8192 trainer.accelerator=gpu tracking=none` (12 jobs): the wall time of the whole
     command, and the jobs' own `predict_time_s` (sum and largest);
  2. `python -m sweepbp mode=predict model=llama3_1_70b trainer.accelerator=gpu batch.size=1
     batch.seq_len=2048 tracking=none`: its `predict_time_s` and wall time.
With --before, each round runs the other checkout right before this one (its `src` first on PYTHONPATH), so
both see the same machine; the medians over the rounds are printed side by side, with their ratio, and the
peaks the two predicted are compared (they must be equal). With --processes A,B this tree runs with A, then B
prediction processes (SWEEPBP_PREDICTION_PROCESSES) in each round instead. The load average is printed: on a
shared machine compare the ratio, not the seconds.
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

MAP = ["-m", "mode=predict", "model=llama3_8b", "memory=none,ckpt", "batch.size=1,2,4", "batch.seq_len=2048,8192",
       "trainer.accelerator=gpu", "tracking=none"]
SEVENTY = ["mode=predict", "model=llama3_1_70b", "trainer.accelerator=gpu", "batch.size=1", "batch.seq_len=2048",
           "tracking=none"]
HERE = Path(__file__).resolve().parents[1]


def run(tree: Path, args: list[str], extra_env: dict[str, str]) -> tuple[float, float, list[dict]]:
    """Wall seconds of `python -m sweepbp ARGS` with `tree`'s sources, the seconds until its first results.json
    was written, and the results.json records it wrote."""
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(tree / "src"), **extra_env}
    with tempfile.TemporaryDirectory() as folder:
        started, start = time.time(), time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sweepbp", *args], cwd=folder, env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{tree}: `sweepbp {' '.join(args)}` exited {done.returncode}:\n{done.stderr[-2000:]}")
        files = sorted(Path(folder).glob("**/results.json"))
        first = min(f.stat().st_mtime for f in files) - started
        records = [json.loads(p.read_text()) for p in files]
    return wall, first, records


def measure(tree: Path, extra_env: dict[str, str]) -> dict[str, float | list]:
    wall, first, records = run(tree, MAP, extra_env)
    times = [r["metrics"]["predict_time_s"] for r in records]
    seventy_wall, _, seventy = run(tree, SEVENTY, extra_env)
    return {"map_wall_s": wall, "map_first_result_s": first, "map_predict_sum_s": sum(times),
            "map_predict_max_s": max(times), "70b_predict_s": seventy[0]["metrics"]["predict_time_s"],
            "70b_wall_s": seventy_wall,
            "peaks": sorted(r["metrics"]["predicted_peak_memory_bytes"] for r in records + seventy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another sweepbp checkout, run before this one in each round")
    parser.add_argument("--processes", help="A,B: this tree with A, then B prediction processes in each round")
    args = parser.parse_args()
    if args.processes:
        first, second = args.processes.split(",")
        settings = {f"{first} processes": (HERE, {"SWEEPBP_PREDICTION_PROCESSES": first}),
                    f"{second} processes": (HERE, {"SWEEPBP_PREDICTION_PROCESSES": second})}
    elif args.before:
        settings = {"before": (args.before.resolve(), {}), "after": (HERE, {})}
    else:
        settings = {"this tree": (HERE, {})}
    compared = len(settings) == 2
    rounds: dict[str, list[dict]] = {name: [] for name in settings}
    for index in range(args.rounds):
        for name, (tree, extra_env) in settings.items():
            rounds[name].append(measure(tree, extra_env))
        print(f"round {index + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    trees = list(settings)
    keys = [k for k in rounds[trees[0]][0] if k != "peaks"]
    print(f"medians of {args.rounds} rounds on {os.cpu_count()} CPUs (load average now {os.getloadavg()[0]:.2f})")
    print("| figure | " + " | ".join(trees) + (f" | {trees[1]} / {trees[0]} |" if compared else " |"))
    print("|---|" + "---|" * (len(trees) + compared))
    for key in keys:
        values = [statistics.median(r[key] for r in rounds[name]) for name in trees]
        ratio = f" {values[1] / values[0]:.2f} |" if compared else ""
        print(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + " |" + ratio)
    if compared:
        same = all(b["peaks"] == a["peaks"] for b, a in zip(*rounds.values()))
        print(f"predicted peaks of the 13 predictions equal in both: {same}")


if __name__ == "__main__":
    main()
