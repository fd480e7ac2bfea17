"""Where a sweep's CPU goes, process by process: runs `python -m sweepbp ARGS` in a temporary folder and samples
the CPU time of every process of its tree (the sweep process, its fork server, the jobs or the prediction
process forked from it) from /proc, every 0.25 s. Prints each process's CPU seconds and, second by second, how
much of a CPU each used. Linux only; not a test (the figures depend on the machine and its load).

    python benchmarks/cpu_by_process.py -m mode=predict model=llama3_8b memory=none,ckpt batch.size=1,2,4 \\
        batch.seq_len=2048,8192 trainer.accelerator=gpu tracking=none

A second prediction process: SWEEPBP_PREDICTION_PROCESSES=2 before the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PERIOD_S = 0.25


@dataclass
class Sample:
    parent: int
    cpu_s: float  # user + system time so far
    command: str


def processes() -> dict[int, Sample]:
    """Every process of the machine: its parent, CPU time so far and command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        found[int(entry.name)] = Sample(int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS, command[:90])
    return found


def descendants(root: int, table: dict[int, Sample]) -> set[int]:
    tree, grown = {root}, True
    while grown:
        grown = False
        for pid, sample in table.items():
            if sample.parent in tree and pid not in tree:
                tree.add(pid)
                grown = True
    return tree


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sweepbp-cpu-") as folder:
        report(*sample(folder))


def sample(folder: str) -> tuple[float, int, dict[int, float], dict[int, str], dict[int, dict[int, float]]]:
    """Run the sweep in `folder`: its wall seconds, exit code, and each process's CPU seconds, command and CPU
    seconds per second of the run."""
    start = time.perf_counter()
    sweep = subprocess.Popen([sys.executable, "-m", "sweepbp", *sys.argv[1:]], cwd=folder,
                             env={**os.environ, "CI": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total: dict[int, float] = {}
    names: dict[int, str] = {}
    per_second: dict[int, dict[int, float]] = {}
    while sweep.poll() is None:
        table = processes()
        second = int(time.perf_counter() - start)
        for pid in descendants(sweep.pid, table):
            used = table[pid].cpu_s - total.get(pid, 0.0)
            total[pid], names[pid] = table[pid].cpu_s, table[pid].command or names.get(pid, "")
            per_second.setdefault(second, {}).setdefault(pid, 0.0)
            per_second[second][pid] += used
        time.sleep(PERIOD_S)
    return time.perf_counter() - start, sweep.returncode, total, names, per_second


def report(wall: float, code: int, total: dict[int, float], names: dict[int, str],
           per_second: dict[int, dict[int, float]]) -> None:
    print(f"wall {wall:.2f} s, exit {code}; CPU seconds by process:")
    pids = sorted(total)
    for number, pid in enumerate(pids):
        print(f"  p{number} {total[pid]:6.2f}  {names[pid]}")
    print("second " + " ".join(f"{f'p{n}':>5}" for n in range(len(pids))))
    for second in sorted(per_second):
        print(f"{second:6d} " + " ".join(f"{per_second[second].get(pid, 0.0):5.2f}" for pid in pids))


if __name__ == "__main__":
    main()
