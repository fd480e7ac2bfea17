"""Every shipped YAML composes and validates; bad input gives one line naming key, value and what is allowed."""

from __future__ import annotations

import pytest

from conftest import compose, problems_of
from sweepbp.cli import available_options, config_dir, expand
from sweepbp.config import GROUPS, ConfigError, leaf_params


@pytest.mark.parametrize("group", GROUPS)
def test_every_shipped_option_composes_and_validates(group, tmp_path):
    options = available_options(group)
    assert options, f"no options in conf/{group}"
    for option in options:
        extra = [f"data.path={__file__}"] if (group, option) == ("data", "text") else []
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


BAD_INPUT = [
    (["memory=foo"], "memory must be one of", "'foo'"),
    (["lora.r=0"], "lora.r must be a positive integer", "0"),
    (["lora.alpha=-1"], "lora.alpha must be a positive number", "-1"),
    (["batch.size=-1"], "batch.size must be a positive integer or 'auto'", "-1"),
    (["batch.seq_len=0"], "batch.seq_len must be a positive integer", "0"),
    (["trainer.steps=0"], "trainer.steps must be a positive integer", "0"),
    (["trainer.warmup_steps=8", "trainer.steps=8"], "trainer.warmup_steps must be below", "8"),
    (["batch.seq_len=4096"], "batch.seq_len must be at most model.config.max_position_embeddings=2048", "4096"),
    (["lora.target_modules=[q_proj,nope]"], "lora.target_modules must be names of the model's linear layers",
     "nope"),
    (["trainer.precision=fp8"], "trainer.precision must be one of", "fp8"),
    (["model.pretrained_path=/does/not/exist"], "model.pretrained_path must be an existing local folder",
     "/does/not/exist"),
    (["lora.r=abc"], "lora.r", "abc"),
]


@pytest.mark.parametrize(("overrides", "message", "value"), BAD_INPUT, ids=[" ".join(c[0]) for c in BAD_INPUT])
def test_bad_input_is_one_line(overrides, message, value):
    problems = problems_of(overrides)
    assert len(problems) == 1, problems
    assert message in problems[0]
    assert value in problems[0]
    assert "\n" not in problems[0]


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    problems = problems_of([f"model.pretrained_path={tmp_path}"])
    assert problems and "pickle" in problems[0] and "safetensors" in problems[0]


def test_all_problems_are_collected_at_once():
    with pytest.raises(ConfigError) as caught:
        compose(["lora.r=0", "batch.size=0"])
    assert len(caught.value.problems) == 2


def test_sweep_without_multirun_flag_is_refused():
    with pytest.raises(ConfigError, match="add -m"):
        expand(["lora.r=8,16"], multirun=False)


def test_sweep_expands_to_the_cartesian_product():
    jobs = expand(["lora.r=8,16", "memory=ckpt,none", "hydra/launcher=basic"], multirun=True)
    assert sorted(map(tuple, jobs)) == sorted([("lora.r=8", "memory=ckpt"), ("lora.r=8", "memory=none"),
                                               ("lora.r=16", "memory=ckpt"), ("lora.r=16", "memory=none")])


def test_shipped_config_dir_exists():
    assert (config_dir() / "config.yaml").is_file()
