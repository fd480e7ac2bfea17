"""Model construction cost: sweepbp's build (directly in the target dtype on the device) against building
in fp32 first and converting (issue #10, item 3).

    python benchmarks/construction.py [override ...]      # default: model=llama3_8b model.config.num_hidden_layers=2

Builds the configured random-init model once each way in this process, on the job's device, and prints
the parameter count and the seconds each took. Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import time

from harness_overhead import compose

DEFAULT = ["model=llama3_8b", "model.config.num_hidden_layers=2", "tracking=none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="sweepbp overrides on top of " + " ".join(DEFAULT))
    args = parser.parse_args()
    run = compose([*DEFAULT, *args.overrides])
    import torch
    from transformers import AutoModelForCausalLM

    from sweepbp.train.environment import pick_device
    from sweepbp.train.model import DTYPES, build_model, hf_config

    cfg, device = run.cfg.model, pick_device(run.cfg.trainer.accelerator)
    start = time.perf_counter()
    model = build_model(cfg, device, seed=0)
    direct = time.perf_counter() - start
    count = sum(p.numel() for p in model.parameters())
    del model
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(cfg)).to(DTYPES[cfg.dtype])
    detour = time.perf_counter() - start
    print(f"# {device}, {count / 1e9:.2f} B parameters in {cfg.dtype}, overrides: {' '.join([*DEFAULT, *args.overrides])}")
    print(f"sweepbp build_model (directly in {cfg.dtype} on {device}): {direct:6.1f} s")
    print(f"fp32 first, then .to({cfg.dtype}):                        {detour:6.1f} s")


if __name__ == "__main__":
    main()
