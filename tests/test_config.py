"""Every shipped YAML composes and validates; bad input gives one line naming key, value and what is allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import compose, run_cli

from sweepbp.cli.paths import config_dir
from sweepbp.cli.precheck import available_options, expand, local_cuda_gpus, precheck
from sweepbp.config import GROUPS, ConfigError, leaf_params, register_schemas


@pytest.mark.parametrize("group", GROUPS)
def test_every_shipped_option_composes_and_validates(group, data_files):
    options = available_options(group)
    assert options, f"no options in conf/{group}"
    paths = {"text": f"data.path={__file__}", "jsonl": f"data.path={data_files.jsonl}",
             "parquet": f"data.path={data_files.parquet}"}
    for option in options:
        extra = [paths[option]] if group == "data" and option in paths else []
        if (group, option) == ("data", "parquet"):
            extra.append("data.text_field=messages")
        run = compose([f"{group}={option}", *extra])
        assert run.choices[group] == option


def test_params_are_dotted_leaves():
    run = compose(["lora.r=16", "memory=ckpt"])
    params = leaf_params(run.cfg)
    assert params["lora.r"] == "16"
    assert params["memory.name"] == "ckpt"
    assert params["model.config.hidden_size"] == "128"
    assert params["batch.size"] == "4"


def test_llama3_8b_is_the_real_architecture():
    cfg = compose(["model=llama3_8b"]).cfg.model.config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (4096, 32, 32, 8, 14336, 128256)


# Every bad input of issue 6 item 7: (command-line arguments, what the one line says, the value it names).
# `{pickle_only}` is a folder holding config.json and pytorch_model.bin only.
BAD_INPUT = [
    (["model=nope"], "model must be one of ", "'nope'"),
    (["memory=foo"], "memory must be one of ", "'foo'"),
    (["lora=nope"], "lora must be one of ", "'nope'"),
    (["lora.r=0"], "lora.r must be a positive integer", "0"),
    (["lora.r=-3"], "lora.r must be a positive integer", "-3"),
    (["lora.alpha=0"], "lora.alpha must be a positive number", "0.0"),
    (["lora.alpha=-1"], "lora.alpha must be a positive number", "-1"),
    (["batch.size=0"], "batch.size must be a positive integer or 'auto'", "0"),
    (["batch.size=-1"], "batch.size must be a positive integer or 'auto'", "-1"),
    (["batch.seq_len=0"], "batch.seq_len must be a positive integer", "0"),
    (["trainer.steps=0"], "trainer.steps must be a positive integer", "0"),
    (["trainer.steps=-2"], "trainer.steps must be a positive integer", "-2"),
    (["trainer.warmup_steps=0"], "trainer.warmup_steps must be at least 1", "0"),
    (["trainer.warmup_steps=8", "trainer.steps=8"], "trainer.warmup_steps must be below trainer.steps - 1 = 7", "8"),
    (["trainer.warmup_steps=7", "trainer.steps=8"], "trainer.warmup_steps must be below trainer.steps - 1 = 7", "7"),
    (["batch.seq_len=4096"], "batch.seq_len must be at most model.config.max_position_embeddings=2048", "4096"),
    (["lora.target_modules=[q_proj,nope]"], "lora.target_modules must be all-linear or names of llama's linear layers",
     "nope"),
    (["trainer.precision=fp8"], "trainer.precision must be one of", "fp8"),
    (["model.pretrained_path=/does/not/exist"], "model.pretrained_path must be an existing local folder",
     "/does/not/exist"),
    (["model.pretrained_path={pickle_only}"], "model.pretrained_path must hold safetensors weights", "pickle"),
    (["model.pretrained_path={broken_weights}"], "model.pretrained_path must hold readable safetensors files",
     "model.safetensors (header too small: the file has 3 bytes)"),
    (["tracking.uri=http://127.0.0.1:1"], "tracking.uri must be a reachable MLflow store", "http://127.0.0.1:1"),
    (["tracking.uri=sqlite:////does/not/exist/mlflow.db"], "tracking.uri must be a reachable MLflow store",
     "/does/not/exist"),
    (["lora.r=[8"], "malformed override 'lora.r=[8'", "expected key=value"),
    (["mode=predict", "model.arch=qwen3_moe", "+model.config.num_experts=4"],
     "mode must be measure for a mixture-of-experts model (model.config.num_experts=4)", "predict"),
    (["memory.every=2"], "memory.every must be a key of the config",
     "(memory=none has no every; memory=ckpt, memory=selective, memory=ckpt_offload have it)"),
    (["hydra/launcher=nope"], "hydra/launcher must be one of basic, joblib, submitit_local, submitit_slurm", "nope"),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.partiton=gpu"],
     "hydra.launcher.partiton must be a key of the config (list them: python -m sweepbp --cfg hydra)", "partiton=gpu"),
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=two"], "hydra.launcher.n_jobs must be an integer", "two"),
    (["lora.r"], "malformed override 'lora.r'", "expected key=value"),
    (["lora.r=abc"], "lora.r must be an integer", "'abc'"),
    (["trainer.lr=fast"], "trainer.lr must be a number", "'fast'"),
    (["nokey=3"], "nokey must be a key of the config", "'nokey=3'"),
    (["memory=chkpt"], "memory must be one of ckpt, ckpt_offload, none, offload, selective, got 'chkpt'",
     "; did you mean 'ckpt'?"),
    (["lora.rr=3"], "lora.rr must be a key of the config", "; did you mean 'lora.r'?"),
    (["memroy=ckpt"], "memroy must be a key of the config", "; did you mean 'memory'?"),
    (["lora.r=8,16"], "lora.r=8,16 is a sweep: add -m", "8,16"),
    (["-m", "lora.r=8,0"], "lora.r must be a positive integer", "0"),
    (["memory=none", "memory.name=ckpt"], "memory.name must be none, the chosen option's own name", "'ckpt'"),
    (["memory.name=nope"], "memory.name must be one of none, ckpt, selective, offload, ckpt_offload", "'nope'"),
    (["strategy=single", "strategy.name=fsdp"], "strategy.name must be single or ddp", "'fsdp'"),
    (["model.config.num_hidden_layers=0"], "model.config.num_hidden_layers must be a positive integer", "0"),
    (["model.config.vocab_size=-5"], "model.config.vocab_size must be a positive integer", "-5"),
    (["model.config.num_attention_heads=3", "model.config.num_key_value_heads=1"],
     "model.config.num_attention_heads must divide model.config.hidden_size=128", "3"),
    (["model.config.num_key_value_heads=3"], "model.config.num_key_value_heads must divide "
     "model.config.num_attention_heads=4", "3"),
]


@pytest.fixture
def pickle_only(tmp_path: Path) -> Path:
    """A checkpoint folder with pickle weights only (loading them could execute code)."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    return tmp_path


@pytest.fixture
def broken_weights(tmp_path: Path) -> Path:
    """A checkpoint folder whose model.safetensors is broken (safetensors says only "header too small")."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"abc")
    return folder


@pytest.mark.parametrize(("args", "message", "value"), BAD_INPUT, ids=[" ".join(c[0]) for c in BAD_INPUT])
def test_bad_input_is_one_line(args, message, value, pickle_only, broken_weights):
    register_schemas()  # as the command line does first (the test must not depend on an earlier one's compose)
    problems, _ = precheck([a.format(pickle_only=pickle_only, broken_weights=broken_weights) for a in args])
    assert len(problems) == 1, problems
    assert message in problems[0]
    assert value in problems[0]
    assert "\n" not in problems[0]


CLI_BAD_INPUT = [
    (["lora.r=0"], "lora.r must be a positive integer, got 0"),
    (["-m", "batch.size=1,0"], "batch.size must be a positive integer or 'auto', got 0"),
    (["lora.r=[8"], "malformed override 'lora.r=[8'"),
    (["memory=chkpt"], "memory must be one of ckpt, ckpt_offload, none, offload, selective, got 'chkpt'; "
                       "did you mean 'ckpt'?"),
    (["--multirn", "lora.r=8,16"], "--multirn must be one of sweepbp's flags (python -m sweepbp --help); "
                                   "did you mean '--multirun'?"),
    (["tracking.uri=http://alice:s3cret@127.0.0.1:1"], "tracking.uri must be a reachable MLflow store, got "
                                                       "'http://***@127.0.0.1:1'"),
    (["memory=none", "memory.name=ckpt"], "memory.name must be none, the chosen option's own name"),
    (["model.config.num_hidden_layers=0"], "model.config.num_hidden_layers must be a positive integer, got 0"),
    (["--cfg", "job", "data.packing=true"], "data.packing must be a key of the config (list them: python -m sweepbp "
                                            "--cfg job), got 'data.packing=true' (data=synthetic has no packing; "
                                            "data=jsonl, data=parquet have it)"),
    pytest.param(["strategy=fsdp", "trainer.devices=2"],
                 "strategy must be single or ddp on a machine without a CUDA GPU, got 'fsdp'", id="strategy=fsdp",
                 marks=pytest.mark.skipif(local_cuda_gpus() != 0, reason="this machine has a CUDA GPU")),
]


@pytest.mark.parametrize(("args", "message"), CLI_BAD_INPUT,
                         ids=[c.id if hasattr(c, "id") else " ".join(c[0]) for c in CLI_BAD_INPUT])
def test_bad_input_through_the_cli_is_one_line_and_records_nothing(args, message, tmp_path):
    done = run_cli(args, cwd=tmp_path, timeout=120)

    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sweepbp: error: {message}"), done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "s3cret" not in done.stderr + done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no job folder: nothing ran


def read_only_mounts() -> bool:
    """Whether this machine lets a test mount a folder read-only in a private mount namespace (root, unshare)."""
    probe = Path(tempfile.mkdtemp())
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -o bind,ro {probe} {probe} && ! touch {probe}/x"],
                              capture_output=True, timeout=30)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(probe)


@pytest.mark.skipif(not read_only_mounts(), reason="needs `unshare -m` and `mount` (root) for a read-only folder: "
                    "root ignores chmod, so only a read-only mount makes a folder unwritable for it")
@pytest.mark.parametrize("place", ["launch folder", "store folder"])
def test_an_unwritable_folder_is_one_line_before_any_job(place, tmp_path):
    """A read-only mount (what fails for root too): `-m` in it, or a SQLite store in it."""
    read_only, launch = tmp_path / "ro", tmp_path / "launch"
    read_only.mkdir()
    launch.mkdir()
    if place == "launch folder":
        cwd, args = read_only, ["-m", "trainer.seed=0,1"]
        message = (f"hydra.sweep.dir and tracking.uri must be in a folder sweepbp can write, got {read_only}, the "
                   "launch folder ([Errno 30] Read-only file system); move them elsewhere, e.g. hydra.sweep.dir=")
    else:
        cwd, args = launch, [f"tracking.uri=sqlite:///{read_only}/mlflow.db"]
        message = (f"tracking.uri must be in a folder sweepbp can write, got {read_only} ([Errno 30] Read-only file "
                   "system); move it elsewhere, e.g. tracking.uri=")
    mount = 'mount -o bind,ro "$0" "$0" && exec "$@"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", mount, str(read_only), sys.executable, "-m", "sweepbp", *args],
                          cwd=cwd, env={**os.environ, "CI": "1"}, capture_output=True, text=True, timeout=120)

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sweepbp: error: {message}"), done.stderr
    assert sorted(p.name for p in [*read_only.iterdir(), *launch.iterdir()]) == []  # nothing written anywhere


def test_bad_input_fails_before_anything_heavy_is_imported(tmp_path):
    """The check runs before torch, transformers, Lightning or mlflow is imported, let alone a model built."""
    probe = tmp_path / "imported.txt"
    code = ("import atexit, os, sys\n"
            "heavy = ('torch', 'transformers', 'lightning', 'mlflow')\n"
            "loaded = lambda: ' '.join(m for m in heavy if m in sys.modules)\n"
            "atexit.register(lambda: open(os.environ['PROBE'], 'w').write(loaded()))\n"
            "from sweepbp.cli.main import main\n"
            "main()")
    done = subprocess.run([sys.executable, "-c", code, "lora.r=0", "batch.seq_len=4096"], cwd=tmp_path,
                          env={**os.environ, "PROBE": str(probe)}, capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 2  # two problems, each one line, reported together
    assert probe.read_text() == ""


def test_all_problems_are_collected_at_once():
    with pytest.raises(ConfigError) as caught:
        compose(["lora.r=0", "batch.size=0"])
    assert len(caught.value.problems) == 2


def test_sweep_without_multirun_flag_is_refused():
    with pytest.raises(ConfigError, match="add -m"):
        expand(["lora.r=8,16"], multirun=False)


def test_sweep_expands_to_the_cartesian_product():
    jobs = expand(["lora.r=8,16", "memory=ckpt,none", "hydra/launcher=basic"], multirun=True)
    launcher = "hydra/launcher=basic"  # Hydra's own settings go with every job, so they are checked too
    assert sorted(map(tuple, jobs)) == sorted([("lora.r=8", "memory=ckpt", launcher), ("lora.r=8", "memory=none", launcher),
                                               ("lora.r=16", "memory=ckpt", launcher), ("lora.r=16", "memory=none", launcher)])


def test_shipped_config_dir_exists():
    assert (config_dir() / "config.yaml").is_file()


SWEEPS_COMPOSED_ONCE = [  # a sweep, and how many distinct choices of groups Hydra composes for it
    (["mode=predict", "memory=none,ckpt", "batch.size=1,auto", "batch.seq_len=64,128", "tracking=none"], 2),
    (["model=llama3_8b,tiny", "lora.target_modules=[q_proj,v_proj]", "budget_gb=null,24", "trainer.lr=1e-4"], 2),
    (["tracking.experiment='two words',${mode}", "model.config.num_hidden_layers=2,3", "hydra.sweep.dir=/tmp/s"], 1),
    (["memory=none,selective", "memory.every=2"], 2),  # every exists in selective only: Hydra's own error for none
    (["lora.r=8,0,abc", "batch.sizee=2,3"], 1),  # invalid, misspelt and mistyped values
    (["+tracking.extra=1", "lora.r=4,8"], 0),  # not a plain field override: Hydra composes these jobs whole
    (["lora.alpha=8", "lora={alpha: 32}", "memory=none,ckpt"], 0),  # a dict for a group: a field override, in place
    (["lora.r=0", "lora={r: 8}"], 0),  # valid as Hydra applies them, in their order
]


@pytest.mark.parametrize(("args", "bases"), SWEEPS_COMPOSED_ONCE, ids=[" ".join(a) for a, _ in SWEEPS_COMPOSED_ONCE])
def test_preflight_composes_each_choice_of_groups_once_into_hydras_config(args, bases):
    """Pre-flight composes a sweep's distinct group choices with Hydra and applies each job's field overrides to a
    copy: every job's config, group choices and problems equal those of Hydra composing the job whole."""
    from omegaconf import OmegaConf

    from sweepbp.cli.precheck import Compositions, _composed, check_job_config

    register_schemas()
    compositions = Compositions()
    for combo in expand(args, multirun=True):
        problems, run = check_job_config(combo, compositions)
        assert (problems, run) == check_job_config(combo), combo
        try:
            whole = _composed(combo)
        except Exception:  # noqa: BLE001 (the same problem line was compared above)
            continue
        ours = compositions.composed(combo)
        job = [OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}) for cfg in (ours, whole)]
        assert job[0] == job[1]
        assert ours.hydra.runtime.choices == whole.hydra.runtime.choices
    assert len(compositions.bases) == bases


def test_preflight_composes_whole_a_job_naming_a_group_of_the_users_conf(tmp_path, monkeypatch):
    """A group of ./conf named like a top-level field (conf/mode/) is Hydra's to resolve: the job is composed
    whole, and its problem is the one Hydra's composition gives."""
    from sweepbp.cli.precheck import Compositions, check_job_config

    (tmp_path / "conf" / "mode").mkdir(parents=True)
    (tmp_path / "conf" / "mode" / "quick.yaml").write_text("trainer:\n  steps: 2\n")
    monkeypatch.chdir(tmp_path)
    register_schemas()
    compositions = Compositions()
    assert check_job_config(["mode=quick"], compositions) == check_job_config(["mode=quick"])
    assert not compositions.bases
