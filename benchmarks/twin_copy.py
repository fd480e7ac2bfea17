"""What a kept twin saves a prediction: building and adapting its twins anew against deep-copying kept ones.

    python benchmarks/twin_copy.py [--rounds N] [override ...]      # default: model=llama3_8b

For the prediction's depth plan (Llama-3.1-8B: twins of 2, 3 and 4 layers), alternates `built_model` (build on
meta, quantise, peft's adapter injection) for every twin with a deep copy of each twin built once
(`adapted_model`'s kept twins, predict/trace.py), and prints the median seconds per prediction of each. Not a
test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from harness_overhead import compose

DEFAULT = ["model=llama3_8b", "mode=predict", "trainer.accelerator=gpu", "tracking=none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="sweepbp overrides on top of " + " ".join(DEFAULT))
    args = parser.parse_args()
    cfg = compose([*DEFAULT, *args.overrides]).cfg
    from sweepbp.predict.trace import built_model, plan_depths

    depths = plan_depths(cfg).depths
    kept = [built_model(cfg, depth) for depth in depths]
    built_s, copied_s = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for depth in depths:
            built_model(cfg, depth)
        built_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for model, _ in kept:
            copy.deepcopy(model)
        copied_s.append(time.perf_counter() - start)
    built, copied = statistics.median(built_s), statistics.median(copied_s)
    print(f"twins of {', '.join(map(str, depths))} layers, median of {args.rounds} rounds: built {built:.3f} s, "
          f"copied {copied:.3f} s per prediction ({copied / built:.2f})")


if __name__ == "__main__":
    main()
