"""Padded against packed, shuffled against longest-first, on one dataset: docs/data.md's table.

    python tests/datafiles.py demo 256        # the generated dataset and its trained tokenizer
    PYTHONPATH=src python benchmarks/data_batching.py demo [--rounds 5] [--threads 1] [override ...]

Runs the five batchings of a dataset (`data.packing`, `data.pad_to`, `data.order`) as real jobs in this one
process, one after another in each round, for several rounds (alternating, so a slow spell of the machine
falls on every option rather than on one). Memory and padding are exact and the same in every round;
throughput is the median over the rounds of each option's `tokens_per_s` (real tokens) and
`padded_tokens_per_s`, and of its paired ratio to the first option (padded, shuffled) in the same round.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from harness_overhead import compose  # the same pre-flight composition

OPTIONS = {  # name -> overrides; the first is what the ratios are against
    "padded, shuffle": ["data.packing=false", "data.order=shuffle"],
    "padded, longest_first": ["data.packing=false", "data.order=longest_first"],
    "padded to max_length, shuffle": ["data.packing=false", "data.pad_to=max_length", "data.order=shuffle"],
    "packed, shuffle": ["data.packing=true", "data.order=shuffle"],
    "packed, longest_first": ["data.packing=true", "data.order=longest_first"],
}
SHOWN = ("peak_memory_bytes", "predicted_peak_memory_bytes", "padding_fraction", "worst_batch_tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="made by tests/datafiles.py: train.jsonl and tok/")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", default=["trainer.steps=24"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sweepbp.job import run_job

    base = ["tracking=none", "data=jsonl", f"data.path={args.folder}/train.jsonl",
            f"data.tokenizer_path={args.folder}/tok", *args.overrides]
    runs = {name: compose([*base, *extra]) for name, extra in OPTIONS.items()}
    rounds: list[dict[str, dict[str, float]]] = []
    for _ in range(args.rounds):
        rounds.append({name: _metrics(run_job(run)) for name, run in runs.items()})
    first = next(iter(OPTIONS))
    print(f"{args.rounds} rounds, torch threads {torch.get_num_threads()}, overrides {' '.join(args.overrides)}\n")
    print("| batching | peak memory | predicted peak | padding_fraction | worst batch tokens | tokens/s (real) | "
          "padded tokens/s | real tokens/s vs padded, shuffle |")
    print("|---|---|---|---|---|---|---|---|")
    for name in OPTIONS:
        exact = rounds[0][name]
        real = statistics.median(r[name]["tokens_per_s"] for r in rounds)
        padded = statistics.median(r[name]["padded_tokens_per_s"] for r in rounds)
        ratio = statistics.median(r[name]["tokens_per_s"] / r[first]["tokens_per_s"] for r in rounds)
        print(f"| {name} | {exact['peak_memory_bytes'] / 1e6:.2f} MB | {exact['predicted_peak_memory_bytes'] / 1e6:.2f} MB"
              f" | {exact['padding_fraction']:.3f} | {exact['worst_batch_tokens']:.0f} | {real:,.0f} | {padded:,.0f} "
              f"| x{ratio:.2f} |")


def _metrics(result) -> dict[str, float]:
    if result.status != "ok":
        raise SystemExit(f"job {result.status}: {result.error}")
    return {k: result.metrics[k] for k in (*SHOWN, "tokens_per_s", "padded_tokens_per_s")}


if __name__ == "__main__":
    main()
