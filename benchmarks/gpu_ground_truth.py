"""Ground truth on one GPU: Llama-3.1-8B LoRA measured and predicted, in one scripted call (issue #9).

    python benchmarks/gpu_ground_truth.py run --out DIR            # on the GPU machine (docs/gpu-ground-truth.md)
    python benchmarks/gpu_ground_truth.py run --cpu-smoke --out DIR  # the same path with the tiny model on CPU (CI)
    python benchmarks/gpu_ground_truth.py import DIR/results.json --tracking-uri sqlite:///mlflow.db
    python benchmarks/gpu_ground_truth.py fetch-wheels             # hydra-core, omegaconf, antlr4 into .whl/

`run` starts one sweep, `python -m sweepbp -m mode=predict,measure ...` with `tracking=none` (the GPU
machine has no MLflow and no network), over model=llama3_8b (bf16), LoRA r=16 on all linear layers,
batch.seq_len=2048, the requested memory strategies that exist in conf/memory/, and batch.size=1,4; then
one short sweep per `--axes` entry at memory=ckpt, batch 1 (loss=fused, QLoRA without and with peft's
fp32 cast, full fine-tuning with 8-bit AdamW by default).
The mode=predict jobs run first (seconds each, on CPU) and predict for CUDA (trainer.accelerator=gpu).
It then writes DIR/results.json (every job's record) and DIR/h200.md (the tables and the comparison
with the claims); `import` puts the records into an MLflow store afterwards, on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from sweepbp.config import GB  # noqa: E402  (decimal GB, as everywhere in sweepbp)

DEFAULT_MEMORY = "none,ckpt,selective,offload"
# The other axes, each one more sweep at memory=ckpt batch.size=1 (predicted and measured): the fused loss,
# QLoRA without and with peft's fp32 cast, full fine-tuning with 8-bit AdamW (bf16 weights and gradients, 2 bytes
# of state a weight: about 48 GB for 8B, which an H200 holds). `;` separates sweeps, spaces the overrides of one.
DEFAULT_AXES = "loss=fused;quant=nf4 quant.prepare=false;quant=nf4;method=full optim=adamw8bit"
NEEDS_BNB = ("quant=", "optim=adamw8bit", "optim=paged_adamw8bit")  # axes that need bitsandbytes
CLAIMS = """\
- LoRA fine-tuning of an 8B model at batch size 1 needs ~16 GB for inference and ~22 GB for training;
- training needs 2-4x the memory of inference;
- backward costs about twice the forward;
- checkpointing trades speed for memory."""


def sweep_overrides(memory: list[str], batch: str, smoke: bool) -> list[str]:
    """The overrides of the one sweep: predictions first, then the measured jobs."""
    common = [f"memory={','.join(memory)}", f"batch.size={batch}", "tracking=none", "lora=all_linear"]
    if smoke:
        return ["mode=predict,measure", *common, "trainer.accelerator=cpu", "batch.seq_len=32",
                "trainer.steps=4", "trainer.warmup_steps=1", "lora.r=4"]
    return ["mode=predict,measure", *common, "model=llama3_8b", "lora.r=16", "batch.seq_len=2048",
            "trainer.accelerator=gpu"]


def axis_overrides(axis: str, smoke: bool) -> list[str]:
    """One extra sweep: an axis's overrides at memory=ckpt, batch 1, on the main sweep's model."""
    base = sweep_overrides(["ckpt"], "1", smoke)
    return [*base, *axis.split()]


def available_axes(requested: str) -> tuple[list[str], list[str]]:
    """The requested axes this machine can run (quant needs bitsandbytes), and those it cannot."""
    import importlib.util

    axes = [a.strip() for a in requested.split(";") if a.strip()]
    missing = [a for a in axes if any(n in a for n in NEEDS_BNB) and importlib.util.find_spec("bitsandbytes") is None]
    return [a for a in axes if a not in missing], missing


def available_memory(requested: list[str]) -> tuple[list[str], list[str]]:
    """The requested strategies that exist as conf/memory/<name>.yaml, and those that do not."""
    shipped = {p.stem for p in (REPO / "conf" / "memory").glob("*.yaml")}
    return [m for m in requested if m in shipped], [m for m in requested if m not in shipped]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    memory, missing = available_memory(args.memory.split(","))
    log = open(out / "log.txt", "w")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(f"[ground-truth] {time.strftime('%Y-%m-%d %H:%M:%S %Z')} memory={','.join(memory)} batch={args.batch}"
        + (f" (not in conf/memory, skipped: {','.join(missing)})" if missing else ""))
    say(f"[ground-truth] {versions()}")
    axes, skipped = available_axes(args.axes)
    if skipped:
        say(f"[ground-truth] bitsandbytes is not installed, skipped: {';'.join(skipped)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "SWEEPBP_QUIET": "1"}
    sweeps = [sweep_overrides(memory, args.batch, args.cpu_smoke), *(axis_overrides(a, args.cpu_smoke) for a in axes)]
    results, commands, code = [], [], 0
    for number, overrides in enumerate(sweeps):
        sweep_dir = out / ("multirun" if number == 0 else f"multirun_axis{number}")
        command = [sys.executable, "-m", "sweepbp", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
        say("[ground-truth] " + " ".join(command))
        start = time.perf_counter()
        done = subprocess.run(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in done.stdout.splitlines():
            if "Warning" not in line and "warnings.warn" not in line:
                say(line)
        say(f"[ground-truth] sweep exit {done.returncode} after {time.perf_counter() - start:.0f} s")
        results += collect(sweep_dir)
        commands.append(" ".join(command))
        code = code or done.returncode
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "h200.md").write_text(report(results, "`, `".join(commands), args.cpu_smoke))
    say(f"[ground-truth] {len(results)} job records: {out / 'results.json'}, tables: {out / 'h200.md'}")
    return code


def versions() -> str:
    found = []
    for name in ("torch", "transformers", "peft", "lightning", "hydra", "omegaconf", "mlflow"):
        try:
            module = __import__(name)
            found.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            found.append(f"{name} missing")
    return ", ".join(found)


def collect(sweep_dir: Path) -> list[dict]:
    """Every job's results.json in the sweep, in job order."""
    paths = sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return [json.loads(p.read_text()) for p in paths]


# ---------------------------------------------------------------------------------------------
# The report


def key(result: dict) -> tuple[str, int, str]:
    """(memory, batch, the other axes' options that are not their defaults)."""
    config = result["config"]
    variant = []
    if config.get("loss", {}).get("name", "standard") != "standard":
        variant.append(f"loss={config['loss']['name']}")
    quant = config.get("quant", {})
    if quant.get("name", "none") != "none":
        variant.append(f"quant={quant['name']}" + ("" if quant.get("prepare", True) else " prepare=false"))
    for group, default in (("method", "lora"), ("optim", "adamw")):
        if config.get(group, {}).get("name", default) != default:
            variant.append(f"{group}={config[group]['name']}")
    return config["memory"]["name"], int(config["batch"]["size"]), " ".join(variant)


def gb(value: float | None) -> str:
    """GB with 4 significant digits (the tiny model's megabytes stay readable)."""
    return "" if value is None else f"{value / GB:.4g}"


def pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f}%"


def num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def report(results: list[dict], command: str, smoke: bool) -> str:
    measured = [r for r in results if r["mode"] == "measure"]
    predicted = {key(r): r for r in results if r["mode"] == "predict"}
    env = measured[0]["environment"] if measured else (results[0]["environment"] if results else {})
    title = "CPU smoke run (tiny model)" if smoke else "Llama-3.1-8B LoRA on one GPU: measured and predicted"
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"Date: {time.strftime('%Y-%m-%d')}. Device: {env.get('device_name', '?')}; torch {env.get('torch', '?')}, "
             f"CUDA {env.get('cuda', '-')}, driver {env.get('driver', '-')}, transformers {env.get('transformers', '?')}, "
             f"peft {env.get('peft', '?')}, lightning {env.get('lightning', '?')}; "
             f"PYTORCH_CUDA_ALLOC_CONF='{env.get('PYTORCH_CUDA_ALLOC_CONF', '')}'; git {env.get('git_commit', '?')[:10]}.",
             "", "## Speed", "",
             "| memory | batch | other axes | status | tokens/s | step s | fwd s | bwd s | optim s | bwd/fwd | MFU | setup s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in measured:
        m = r["metrics"]
        lines.append(f"| {key(r)[0]} | {key(r)[1]} | {key(r)[2]} | {r['status']} | {num(m.get('tokens_per_s'), ',.0f')} | "
                     f"{num(m.get('step_time_s'), '.3f')} | {num(m.get('fwd_time_s'), '.3f')} | "
                     f"{num(m.get('bwd_time_s'), '.3f')} | {num(m.get('optim_time_s'), '.3f')} | "
                     f"{num(m.get('bwd_fwd_ratio'), '.2f')} | {num(m.get('mfu'), '.3f')} | "
                     f"{num(m.get('setup_time_s'), '.1f')} |")
    lines += ["", "## Memory (GB = 1e9 bytes)", "",
              "| memory | batch | other axes | peak (tracker) | allocated peak | tracker vs allocator | reserved peak "
              "| NVML process | activations | logits | inference peak | predicted peak (in job) | error vs tracker "
              "| error vs allocator | predicted peak (mode=predict) | formula peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in measured:
        m, p = r["metrics"], predicted.get(key(r), {}).get("metrics", {})
        lines.append(f"| {key(r)[0]} | {key(r)[1]} | {key(r)[2]} | {gb(m.get('peak_memory_bytes'))} | "
                     f"{gb(m.get('peak_allocated_bytes'))} | "
                     f"{pct(m.get('tracker_vs_allocated_pct'))} | {gb(m.get('peak_reserved_bytes'))} | {gb(m.get('nvml_process_bytes'))} | "
                     f"{gb(m.get('activation_bytes'))} | {gb(m.get('logits_bytes'))} | {gb(m.get('inference_peak_bytes'))} | "
                     f"{gb(m.get('predicted_peak_memory_bytes'))} | {pct(m.get('predicted_error_pct'))} | "
                     f"{pct(m.get('predicted_allocator_error_pct'))} | {gb(p.get('predicted_peak_memory_bytes'))} | "
                     f"{gb(m.get('formula_peak_memory_bytes'))} |")
    lines += ["", "## Predictions (mode=predict)", "",
              "| memory | batch | other axes | status | target | predicted peak | activations | inference peak | seconds "
              "| kernels |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in predicted.values():
        m = r["metrics"]
        lines.append(f"| {key(r)[0]} | {key(r)[1]} | {key(r)[2]} | {r['status']} | "
                     f"{r['environment'].get('predicted_device', '')} | "
                     f"{gb(m.get('predicted_peak_memory_bytes'))} | {gb(m.get('predicted_activation_bytes'))} | "
                     f"{gb(m.get('predicted_inference_peak_bytes'))} | {num(m.get('predict_time_s'), '.1f')} | "
                     f"{r['environment'].get('predicted_kernels', '')} |")
    failures = [r for r in results if r["status"] != "ok"]
    if failures:
        lines += ["", "## Jobs that did not finish ok", ""]
        lines += [f"- {r['mode']} {key(r)[0]} batch {key(r)[1]} {key(r)[2]}: {r['status']}: {r.get('error')}"
                  for r in failures]
    lines += ["", "## The claims", "", CLAIMS, "", *claims(measured)]
    return "\n".join(lines) + "\n"


def claims(measured: list[dict]) -> list[str]:
    """Each claim against the measurements, as figures; the verdict in words is left to the reader of
    the numbers (docs/results/h200.md), since a threshold here would be invented."""
    by = {key(r)[:2]: r["metrics"] for r in measured if r["status"] == "ok" and not key(r)[2]}
    lines = []
    none1 = by.get(("none", 1))
    if none1:
        allocator = none1.get("peak_allocated_bytes")
        lines.append(f"- batch 1, memory=none: inference peak {gb(none1.get('inference_peak_bytes'))} GB, training "
                     f"peak {gb(none1.get('peak_memory_bytes'))} GB"
                     + (f" (allocator peak {gb(allocator)} GB)." if allocator else "."))
    for (memory, batch), m in sorted(by.items()):
        ratio = m.get("train_inference_memory_ratio")
        lines.append(f"- {memory} batch {batch}: training / inference memory {num(ratio, '.2f')}x, "
                     f"backward / forward time {num(m.get('bwd_fwd_ratio'), '.2f')}x.")
    for (memory, batch), m in sorted(by.items()):
        base = by.get(("none", batch))
        if memory == "none" or not base or not m.get("step_time_s") or not base.get("step_time_s"):
            continue
        lines.append(f"- {memory} vs none at batch {batch}: step time {m['step_time_s'] / base['step_time_s']:.2f}x, "
                     f"peak memory {m['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x.")
    ckpt1 = by.get(("ckpt", 1))
    for r in measured:
        memory, batch, variant = key(r)
        m = r["metrics"]
        if variant and r["status"] == "ok" and ckpt1 and m.get("step_time_s") and ckpt1.get("step_time_s"):
            lines.append(f"- {variant} vs the defaults (ckpt, batch 1): step time "
                         f"{m['step_time_s'] / ckpt1['step_time_s']:.2f}x, peak memory "
                         f"{m['peak_memory_bytes'] / ckpt1['peak_memory_bytes']:.2f}x.")
    return lines or ["- no measured job finished ok."]


# ---------------------------------------------------------------------------------------------
# Into MLflow afterwards, and the wheels for the GPU machine


def import_results(args: argparse.Namespace) -> int:
    """Record every job of a results.json in an MLflow store, grouped under one sweep run."""
    import tempfile

    sys.path.insert(0, str(REPO / "src"))
    from sweepbp.config import TrackingConfig
    from sweepbp.result import JobResult
    from sweepbp.tracking import SWEEP_GROUP, SweepAbout, open_store, sweep_group

    results = [JobResult(**r) for r in json.loads(Path(args.results).read_text())]
    recorder = open_store(TrackingConfig(uri=args.tracking_uri, experiment=args.experiment))
    source = Path(args.results).resolve().parent
    sweep_id = args.sweep_id or source.name
    about = SweepAbout(f"GPU ground truth (imported, {len(results)} jobs)",
                       f"python benchmarks/gpu_ground_truth.py import {args.results}", {})
    parent = recorder.open_sweep(sweep_id, source, about)
    for number, result in enumerate(results):
        name = (f"{result.mode} {result.choices.get('model', '')} {result.config['memory']['name']} "
                f"b={result.config['batch']['size']}")
        run_id = recorder.open_job(result, name, parent, {"sweepbp.sweep_id": sweep_id, "sweepbp.job_num": str(number),
                                                            SWEEP_GROUP: sweep_group(about, sweep_id)})
        with tempfile.TemporaryDirectory() as folder:
            recorder.finish_job(run_id, result, [result.write(Path(folder))])
    print(f"imported {len(results)} runs into {args.tracking_uri} (experiment {args.experiment})")
    return 0


def fetch_wheels(args: argparse.Namespace) -> int:
    """hydra-core, omegaconf and antlr4 (pure Python) into .whl/, for a machine without them or a network."""
    folder = Path(args.dest).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(folder),
                    "hydra-core==1.3.2", "omegaconf==2.3.0"], check=True)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), "antlr4-python3-runtime==4.9.3"], check=True)
    print(f"wheels in {folder}: {sorted(p.name for p in folder.glob('*.whl'))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="the sweep, its records and its tables")
    go.add_argument("--out", default=os.environ.get("OUT", "gpu-ground-truth"), help="output folder ($OUT on the device)")
    go.add_argument("--memory", default=DEFAULT_MEMORY, help="memory strategies; those missing in conf/memory/ are skipped")
    go.add_argument("--batch", default="1,4", help="batch sizes")
    go.add_argument("--axes", default=DEFAULT_AXES, help="more sweeps at memory=ckpt batch 1, ';'-separated "
                    "(quant ones are skipped without bitsandbytes); '' for none")
    go.add_argument("--cpu-smoke", action="store_true", help="the tiny model on CPU, batch 1: the path CI tests")
    into = sub.add_parser("import", help="record a results.json in MLflow")
    into.add_argument("results")
    into.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    into.add_argument("--experiment", default="gpu-ground-truth")
    into.add_argument("--sweep-id", default=None)
    wheels = sub.add_parser("fetch-wheels", help="wheels for a GPU machine without hydra-core/omegaconf")
    wheels.add_argument("--dest", default=str(REPO / ".whl"))
    args = parser.parse_args(argv)
    if args.command == "run" and args.cpu_smoke and args.batch == "1,4":
        args.batch = "1"
    return {"run": run, "import": import_results, "fetch-wheels": fetch_wheels}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
