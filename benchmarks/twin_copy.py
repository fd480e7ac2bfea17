"""What a kept twin saves a prediction: building and adapting its twins anew against copying kept ones.

    python benchmarks/twin_copy.py [--rounds N] [override ...]      # default: model=llama3_8b

For the prediction's depth plan (Llama-3.1-8B: twins of 2, 3 and 4 layers), alternates `built_model` (build on
meta, quantise, peft's adapter injection) for every twin with a deep copy of each twin built once, by
`copy.deepcopy` and by `module_copy` (what `adapted_model` hands out of its kept twins, predict/copying.py), and
prints the median seconds per prediction of each. Not a test: the figures depend on the machine.
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
    from sweepbp.predict.copying import module_copy
    from sweepbp.predict.trace import built_model, plan_depths

    depths = plan_depths(cfg).depths
    kept = [model for model, _ in (built_model(cfg, depth) for depth in depths)]
    ways = {"built": lambda: [built_model(cfg, depth) for depth in depths],
            "copy.deepcopy": lambda: [copy.deepcopy(model) for model in kept],
            "module_copy": lambda: [module_copy(model) for model in kept]}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    shown = [f"{name} {value:.3f} ({value / medians['built']:.2f} of built)" for name, value in medians.items()]
    print(f"twins of {', '.join(map(str, depths))} layers, median seconds per prediction of {args.rounds} rounds: "
          + ", ".join(shown))


if __name__ == "__main__":
    main()
