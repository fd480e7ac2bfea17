"""How far the closed-form estimate (predict/estimate.py) lands from the traced prediction.

    python benchmarks/formula_vs_trace.py

Prints one markdown row per job: the formula's peak, activations and logits against the trace's, for
Llama-3.1-8B (predicted for CUDA, batch 1 x 2048) and the tiny model (for CPU, the tests' FAST shape),
with memory=none and ckpt and each loss the formula knows. No timing: the figures do not depend on the machine.
"""

from __future__ import annotations

from harness_overhead import compose

FAST = ["trainer.steps=4", "trainer.warmup_steps=1", "batch.size=2", "batch.seq_len=32"]
MODELS = {"8B": (["model=llama3_8b", "batch.size=1", "batch.seq_len=2048"], "cuda"), "tiny": (FAST, "cpu")}
FIGURES = ("peak_memory_bytes", "activation_bytes", "logits_bytes")


def main() -> None:
    from sweepbp.predict.estimate import estimate
    from sweepbp.predict.trace import predict
    from sweepbp.train.model import hf_config

    print("| job | " + " | ".join(f"formula vs traced {name.removesuffix('_bytes')}" for name in FIGURES) + " |")
    print("|---|" + "---|" * len(FIGURES))
    for label, (overrides, device) in MODELS.items():
        for memory in ("none", "ckpt"):
            for loss in ("standard", "chunked", "fused"):
                cfg = compose([*overrides, f"memory={memory}", f"loss={loss}", "tracking=none"]).cfg
                prediction = predict(cfg, device)
                traced = prediction.metrics()
                formula = estimate(cfg, hf_config(cfg.model), int(cfg.batch.size), prediction.adapted_layers).metrics()
                cells = [f"{100 * (formula['formula_' + n] / traced['predicted_' + n] - 1):+.1f}%" for n in FIGURES]
                print(f"| {label} {memory} {loss} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
