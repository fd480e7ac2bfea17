"""How long a memory map takes: the 12-configuration Llama-3.1-8B prediction sweep and one 70B prediction
(issue #17), for this tree and, optionally, another checkout of sweepbp in alternating rounds.

    python benchmarks/predict_map.py [--rounds N] [--before PATH_TO_OTHER_CHECKOUT]

Each round runs, with the real command line in a fresh temporary folder:
  1. `python -m sweepbp -m mode=predict model=llama3_8b memory=none,ckpt batch.size=1,2,4
     batch.seq_len=2048,8192 trainer.accelerator=gpu tracking=none` (12 jobs): the wall time of the whole
     command, and the jobs' own `predict_time_s` (sum and largest);
  2. `python -m sweepbp mode=predict model=llama3_1_70b trainer.accelerator=gpu batch.size=1
     batch.seq_len=2048 tracking=none`: its `predict_time_s` and wall time.
With --before, each round runs the other checkout right before this one (its `src` first on PYTHONPATH), so
both see the same machine; the medians over the rounds are printed side by side, with their ratio, and the
peaks the two predicted are compared (they must be equal). The load average is printed: on a shared machine
compare the ratio, not the seconds.
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


def run(tree: Path, args: list[str]) -> tuple[float, list[dict]]:
    """Wall seconds of `python -m sweepbp ARGS` with `tree`'s sources, and the results.json records it wrote."""
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(tree / "src")}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sweepbp", *args], cwd=folder, env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{tree}: `sweepbp {' '.join(args)}` exited {done.returncode}:\n{done.stderr[-2000:]}")
        records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("**/results.json"))]
    return wall, records


def measure(tree: Path) -> dict[str, float | list]:
    wall, records = run(tree, MAP)
    times = [r["metrics"]["predict_time_s"] for r in records]
    seventy_wall, seventy = run(tree, SEVENTY)
    return {"map_wall_s": wall, "map_predict_sum_s": sum(times), "map_predict_max_s": max(times),
            "70b_predict_s": seventy[0]["metrics"]["predict_time_s"], "70b_wall_s": seventy_wall,
            "peaks": sorted(r["metrics"]["predicted_peak_memory_bytes"] for r in records + seventy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another sweepbp checkout, run before this one in each round")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE} if args.before else {"this tree": HERE}
    rounds: dict[str, list[dict]] = {name: [] for name in trees}
    for index in range(args.rounds):
        for name, tree in trees.items():
            rounds[name].append(measure(tree))
        print(f"round {index + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    keys = [k for k in rounds[next(iter(trees))][0] if k != "peaks"]
    print(f"medians of {args.rounds} rounds on {os.cpu_count()} CPUs (load average now {os.getloadavg()[0]:.2f})")
    print("| figure | " + " | ".join(trees) + (" | after / before |" if args.before else " |"))
    print("|---|" + "---|" * (len(trees) + bool(args.before)))
    for key in keys:
        values = [statistics.median(r[key] for r in rounds[name]) for name in trees]
        ratio = f" {values[1] / values[0]:.2f} |" if args.before else ""
        print(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + " |" + ratio)
    if args.before:
        same = all(b["peaks"] == a["peaks"] for b, a in zip(rounds["before"], rounds["after"]))
        print(f"predicted peaks of the 13 predictions equal before and after: {same}")


if __name__ == "__main__":
    main()
