"""Predicted against measured for random combinations of options and model families, on this machine's CPU.

    python benchmarks/random_combinations.py [--seed N] [--count N] [--cuda-predict] [--shapes]

Each combination draws one option of memory, loss, method, optim, trainer.precision, quant, batch.accumulate, lora
and data, a model (the tiny default, a shrunken preset, or another family's config.json: GPT-2, GPT-NeoX, Falcon,
OPT, Phi, StableLM, Starcoder2, Cohere, Granite, OLMo-2, Qwen2) and sometimes eager attention; `--shapes` draws
batch.size, batch.seq_len and memory.every too. Combinations the pre-flight refuses are drawn again, and so are
the known limits below. Each is run as a measured CPU job (`run_job`, which also predicts it), and every predicted
byte figure must equal the measured one; `--cuda-predict` also predicts it for CUDA (`trainer.accelerator=gpu`),
which must end `ok`. One line per combination; exit status 1 if any differs or fails.

Known limits, not drawn: `lora=attn` with a family whose attention layers have other names, and loss=fused with
a family whose head rescales its logits (Cohere, Granite): one-line errors at run time; quant with `*-mixed` precision (not predicted: a prediction_error), quant=int8 with method=dora
(bitsandbytes' CPU int8 matmul fails after peft's DoRA set-up). Not a test: it takes minutes (about 2 s a
combination); tests/ keep the cases it found.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from harness_overhead import compose

TINY_RUN = ["trainer.steps=4", "trainer.warmup_steps=1", "batch.size=2", "batch.seq_len=32", "tracking=none"]
SHRINK = ["model.dtype=float32", "model.config.hidden_size=64", "model.config.intermediate_size=128",
          "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
          "model.config.num_key_value_heads=2", "model.config.vocab_size=256", "++model.config.head_dim=16",
          "++model.config.pad_token_id=0"]
PRESETS = ["llama3_2_1b", "qwen2_5_7b", "qwen3_8b", "mistral_7b", "gemma3_4b", "phi3_mini"]
GQA = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
       "intermediate_size": 128, "vocab_size": 256}
FAMILIES = {  # config.json fields of small models of other families (model_type added)
    "gpt2": {"n_embd": 64, "n_layer": 3, "n_head": 2, "vocab_size": 256, "n_positions": 256},
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 128,
                 "vocab_size": 256},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "vocab_size": 256},
    "opt": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "ffn_dim": 128, "vocab_size": 256,
            "word_embed_proj_dim": 64, "max_position_embeddings": 256},
    "phi": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 128,
            "vocab_size": 256},
    **{family: GQA for family in ("stablelm", "starcoder2", "cohere", "granite", "olmo2", "qwen2")},
}
LLAMA_NAMED = {"qwen2", "granite", "olmo2", "cohere", "stablelm"}  # attention layers named q/k/v/o_proj
RESCALED_HEADS = {"cohere", "granite"}  # their heads rescale the logits: loss=fused refuses them
OPTIONS = {
    "memory": ["none", "ckpt", "selective", "offload", "ckpt_offload"],
    "loss": ["standard", "chunked", "fused"],
    "method": ["lora", "dora", "full"],
    "optim": ["adamw", "adafactor", "sgd", "adamw8bit"],
    "trainer.precision": ["32-true", "bf16-mixed", "bf16-true", "16-mixed"],
    "quant": ["none", "none", "nf4", "int8"],
    "batch.accumulate": ["1", "1", "2"],
    "lora": ["all_linear", "all_linear", "attn"],
    "data": ["synthetic", "synthetic", "text"],
}


def draw(rng: random.Random, configs: Path, shapes: bool) -> list[str]:
    """One combination's overrides (not yet checked by the pre-flight)."""
    options = [f"{group}={rng.choice(choices)}" for group, choices in OPTIONS.items()]
    if shapes:
        options += [f"batch.size={rng.choice([1, 2, 3])}", f"batch.seq_len={rng.choice([17, 32, 48])}"]
        if any(o in options for o in ("memory=ckpt", "memory=selective", "memory=ckpt_offload")):
            options.append(f"memory.every={rng.choice([1, 2])}")
    model = rng.choice(["tiny", "tiny", *PRESETS, *(f"family:{f}" for f in FAMILIES)])
    if model.startswith("family:"):
        chosen = [f"model.config_path={configs / model.split(':')[1]}"]
    else:
        chosen = [] if model == "tiny" else [f"model={model}", *SHRINK]
    if rng.random() < 0.2:
        chosen.append("model.attn_implementation=eager")
    if any(o in options for o in ("quant=nf4", "quant=int8")) and "model.dtype=float32" not in chosen:
        chosen.append("model.dtype=bfloat16")
    return [*TINY_RUN, *chosen, *options]


def known_limit(overrides: list[str]) -> bool:
    given = set(overrides)
    family = next((o.rsplit("/", 1)[1] for o in overrides if o.startswith("model.config_path=")), None)
    quantised = bool(given & {"quant=nf4", "quant=int8"})
    return (("lora=attn" in given and family is not None and family not in LLAMA_NAMED)
            or ("loss=fused" in given and family in RESCALED_HEADS)
            or (quantised and bool(given & {"trainer.precision=bf16-mixed", "trainer.precision=16-mixed"}))
            or {"quant=int8", "method=dora"} <= given)


def check(overrides: list[str], cuda_predict: bool) -> str | None:
    """None if the prediction equals the measurement (and the CUDA prediction ends ok), else what differs."""
    from sweepbp.job import run_job
    from sweepbp.metrics import CATALOGUE

    result = run_job(compose(overrides))
    if result.status != "ok":
        return f"{result.status}: {result.error}"
    if "prediction_error" in result.environment:
        return f"prediction_error: {result.environment['prediction_error']}"
    figures = [m.name for m in CATALOGUE if m.predicted and m.unit == "bytes"]
    differ = {name: (result.metrics.get(f"predicted_{name}"), result.metrics.get(name)) for name in figures
              if result.metrics.get(f"predicted_{name}") != result.metrics.get(name)}
    if differ:
        return f"predicted != measured: {differ}"
    if cuda_predict:
        cuda = run_job(compose([*overrides, "mode=predict", "trainer.accelerator=gpu"]))
        if cuda.status != "ok":
            return f"CUDA prediction {cuda.status}: {cuda.error}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--cuda-predict", action="store_true", help="also predict each for CUDA (must end ok)")
    parser.add_argument("--shapes", action="store_true", help="draw batch.size, batch.seq_len, memory.every too")
    args = parser.parse_args()
    from sweepbp.cli.precheck import check_job_config
    from sweepbp.config import register_schemas

    register_schemas()
    rng = random.Random(args.seed)
    failed = 0
    with tempfile.TemporaryDirectory() as folder:
        configs = Path(folder)
        for family, fields in FAMILIES.items():
            (configs / family).mkdir()
            (configs / family / "config.json").write_text(json.dumps({"model_type": family, **fields}))
        done = 0
        while done < args.count:
            overrides = draw(rng, configs, args.shapes)
            if known_limit(overrides) or check_job_config(overrides)[0]:
                continue
            done += 1
            start = time.perf_counter()
            wrong = check(overrides, args.cuda_predict)
            failed += wrong is not None
            shown = " ".join(o for o in overrides if o not in TINY_RUN and o not in SHRINK)
            print(f"{'ok' if wrong is None else 'WRONG'} {time.perf_counter() - start:.1f}s {shown}"
                  + ("" if wrong is None else f"\n    {wrong}"), flush=True)
    print(f"{args.count} combinations, {failed} wrong")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
