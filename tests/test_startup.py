"""Start-up stays cheap, checked without timing anything: what gets imported, where jobs run, what is built.

Figures (seconds) live in benchmarks/startup.py and docs/performance.md; these tests keep the reasons
for them true: `--help` and config errors never import the heavy libraries, jobs fork from a
pre-importing worker with the sweep's current environment, models are built directly in their dtype.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST, REPO, compose

HEAVY = ("torch", "lightning", "transformers", "peft", "mlflow", "matplotlib")

# Runs the real command line in a fresh interpreter, then reports which heavy modules it imported.
PROBE = """
import json, runpy, sys
heavy_roots = json.loads(sys.argv[2])
sys.argv = ["sweepbp", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("sweepbp", run_name="__main__")
except SystemExit as done:
    code = done.code or 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in heavy_roots)
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def probe(args: list[str], cwd) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(HEAVY)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CI": "1"})
    line = next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("PROBE "))
    return json.loads(line[len("PROBE "):]), done.stdout + done.stderr


def test_help_imports_nothing_heavy_and_lists_the_groups(tmp_path):
    report, output = probe(["--help"], tmp_path)
    assert report == {"code": 0, "heavy": []}, output
    from sweepbp.cli.precheck import available_options

    assert "memory: " + ", ".join(available_options("memory")) in output
    assert "hydra/launcher: basic" in output
    assert "seq_len: 128" in output  # the composed default config


def test_version_names_sweepbp_and_its_stack_without_importing_it(tmp_path):
    from sweepbp import __version__

    report, output = probe(["--version"], tmp_path)
    assert report == {"code": 0, "heavy": []}, output
    first, stack = output.splitlines()[:2]
    assert first == f"sweepbp {__version__}"  # not Hydra's version, which Hydra's own --version prints
    for name in ("torch", "transformers", "peft", "lightning", "hydra-core", "mlflow"):
        assert f"{name} " in stack and f"{name} not installed" not in stack


def test_help_shows_the_config_the_overrides_compose_to(tmp_path):
    report, output = probe(["memory=ckpt", "lora.r=32", "--help"], tmp_path)
    assert report["code"] == 0
    assert "r: 32" in output and "every: 1" in output


@pytest.mark.parametrize("args", [["lora.r=0"], ["-m", "lora.r=8,0"], ["memory=nope"]],
                         ids=["one job", "second job of a sweep", "unknown option"])
def test_config_error_imports_nothing_heavy(tmp_path, args):
    report, output = probe(args, tmp_path)
    assert report == {"code": 2, "heavy": []}, output
    assert "sweepbp: error:" in output
    assert not (tmp_path / "mlflow.db").exists()


def test_job_runs_in_a_fresh_process_with_the_current_environment(monkeypatch):
    """The fork server starts before the job's environment is final (Hydra sets hydra.job.env_set per job,
    tests set variables): the job must still see the environment of the moment it was launched."""
    from sweepbp.sweep.worker import run_isolated, start_method, start_workers

    run = compose([*FAST, "tracking=none"])
    start_workers(run.cfg.model.arch)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = run_isolated(run, "1/1")
    assert result.status == "ok", result.error
    assert result.environment["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert start_method() == "forkserver"
    steps = result.metrics
    assert 0 < steps["train_time_s"] < steps["steps_time_s"] < steps["job_time_s"]


def test_llama3_8b_is_built_in_bf16_without_an_fp32_detour():
    """Built on the meta device so nothing is allocated: every tensor created while building is recorded,
    and none of weight size is float32 (a detour would create 8B fp32 parameters first)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from sweepbp.train.model import build_model

    class Created(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.float32_elements: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                self.float32_elements.append(out.numel())
            return out

    model_cfg = compose(["model=llama3_8b"]).cfg.model
    with Created() as created:
        model = build_model(model_cfg, torch.device("meta"), seed=0)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert {p.device.type for p in params} == {"meta"}
    assert sum(p.numel() for p in params) == 8_030_261_248
    assert max(created.float32_elements, default=0) < 1_000_000  # RoPE frequencies only



def test_worker_warm_up_stays_on_the_meta_device():
    """The fork server runs warm() before any job is forked from it: it must allocate nothing, run no kernel
    on a real device and never initialise CUDA, or the jobs would not start from a clean process."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from sweepbp.sweep.worker import preload_modules
    from sweepbp.train.warmup import warm

    for name in preload_modules("llama")[:-1]:  # what the fork server imports before warming up
        __import__(name)

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(tensor, torch.Tensor):
                    self.seen.add(tensor.device.type)
            return out

    with Devices() as devices:
        warm("llama")
    assert devices.seen == {"meta"}
    assert not torch.cuda.is_initialized()


def test_a_prediction_never_imports_lightning(tmp_path):
    """A sweep of predictions only starts without Lightning (about 1.2-1.9 s of a 2-core machine's start): its
    fork server does not preload it and the prediction itself never imports it (lint-imports checks the modules;
    this checks a real prediction, in a fresh interpreter, and the fork server's preload list)."""
    from sweepbp.sweep.worker import preload_modules

    assert "lightning" not in preload_modules("llama", measured=False)
    assert "lightning" in preload_modules("llama")
    code = ("import sys; from conftest import FAST, compose; from sweepbp.job import run_job; "
            "result = run_job(compose([*FAST, 'mode=predict', 'tracking=none', 'memory=ckpt'])); "
            "print('PROBE', result.status, sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"),
                                                                            os.environ.get("PYTHONPATH", "")])})
    assert "PROBE ok []" in done.stdout, done.stdout + done.stderr


def _hydra_sweep(sweeper: str, folder, monkeypatch) -> tuple[list[str], int]:
    """Each job's config (its own and Hydra's node, as YAML) from a real Hydra multirun with `sweeper`, and how
    many times Hydra composed a job's config for it."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from sweepbp.cli.paths import config_dir
    from sweepbp.config import register_schemas

    compositions = []
    original = ConfigLoaderImpl.load_sweep_config
    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config",
                        lambda self, master_config, sweep_overrides: compositions.append(sweep_overrides)
                        or original(self, master_config, sweep_overrides))
    jobs = []

    def task(cfg):
        hydra = OmegaConf.to_container(HydraConfig.get())
        # what differs: the sweeper chosen, and the command line that chose it
        del hydra["sweeper"], hydra["runtime"]["choices"]["hydra/sweeper"], hydra["overrides"]["hydra"]
        jobs.append(OmegaConf.to_yaml(cfg) + OmegaConf.to_yaml(hydra))

    register_schemas()
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(task_name="sweepbp", config_search_path=create_config_search_path(str(config_dir())))
    try:
        hydra.multirun(config_name="config", task_function=task,
                       overrides=[f"hydra/sweeper={sweeper}", f"hydra.sweep.dir={folder}", "~hydra.callbacks.sweep_end",
                                  "mode=predict", "tracking=none", "memory=none,ckpt", "lora.r=8,16,8"])
    finally:
        GlobalHydra.instance().clear()
    return jobs, len(compositions)


def test_the_sweeper_composes_each_job_once_as_hydra_would(tmp_path, monkeypatch):
    """sweepbp's sweeper hands the basic launcher the compositions of its pre-launch check: each job is composed
    once (Hydra's own sweeper: twice), into the same config (a repeated override list included)."""
    ours, ours_composed = _hydra_sweep("sweepbp", tmp_path, monkeypatch)
    hydras, hydras_composed = _hydra_sweep("basic", tmp_path, monkeypatch)
    assert len(ours) == len(hydras) == 6
    assert ours == hydras
    assert (ours_composed, hydras_composed) == (6, 12)


# A fork server started for jobs that never use bitsandbytes keeps it out; a job that needs it replaces the server.
BITSANDBYTES_PROBE = """
import json, multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from conftest import FAST, compose
from sweepbp.sweep import worker

def bitsandbytes_in_a_job():  # what a process forked from the fork server now finds
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("forkserver")) as pool:
        return pool.submit(eval, "repr(__import__('sys').modules.get('bitsandbytes', 'not imported'))[:30]").result()

worker.start_workers("llama", measured=False, bitsandbytes=False)
seen = {"kept_out": bitsandbytes_in_a_job()}
plain = compose([*FAST, "mode=predict", "tracking=none"])
seen["plain"] = worker.run_isolated(plain, "1/2").status.value
first_server = worker._server_pid()
quantised = compose([*FAST, "mode=predict", "tracking=none", "quant=nf4"])
result = worker.run_isolated(quantised, "2/2")
seen.update(quantised=result.status.value, error=result.error, replaced=worker._server_pid() != first_server,
            allowed=bitsandbytes_in_a_job())
print("PROBE " + json.dumps(seen))
"""


def test_bitsandbytes_is_kept_out_of_a_server_whose_jobs_do_not_use_it():
    """Kept out, peft and transformers see it as not installed (1.0-1.6 s less to import, docs/performance.md)
    and a plain prediction runs; a quantised job then gets a new server that imports it."""
    pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    done = subprocess.run([sys.executable, "-c", BITSANDBYTES_PROBE], cwd=REPO / "tests", capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CI": "1"})
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, done.stdout + done.stderr
    seen = json.loads(line[len("PROBE "):])
    assert seen["kept_out"] == "None"
    assert (seen["plain"], seen["quantised"], seen["replaced"]) == ("ok", "ok", True), seen
    assert seen["allowed"].startswith("<module 'bitsandbytes'")


def test_only_a_sweep_of_bitsandbytes_options_may_need_it_beyond_its_first_job():
    from sweepbp.cli.main import sweeps_bitsandbytes_options

    assert sweeps_bitsandbytes_options(["quant=none,nf4"])
    assert sweeps_bitsandbytes_options(["optim=adamw,adamw8bit", "memory=ckpt"])
    assert sweeps_bitsandbytes_options(["quant.compute_dtype=bfloat16,float32"])  # a field: decided per job
    assert not sweeps_bitsandbytes_options(["optim=adamw,sgd,adafactor"])
    assert not sweeps_bitsandbytes_options(["quant=nf4", "memory=none,ckpt", "lora.r=8,16"])
    assert not sweeps_bitsandbytes_options(["mode=predict", "batch.size=1,2"])
