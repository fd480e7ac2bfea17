"""The models people fine-tune: every preset has its published parameter count, a shrunken twin of each
architecture runs a real CPU job predicted exactly, a config.json of the user's own builds that shape, and
what a model cannot do is a one-line pre-flight error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, compose, problems_of

from sweepbp.job import run_job
from sweepbp.train.model import build_model, hf_config

# Parameter counts published for each model (its safetensors total on the Hugging Face hub).
PUBLISHED = {
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "llama3_1_8b": 8_030_261_248,
    "llama3_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "qwen2_5_7b": 7_615_616_512,
    "qwen3_8b": 8_190_735_360,
    "mistral_7b": 7_248_023_552,
    "gemma2_9b": 9_241_705_984,
    "phi3_mini": 3_821_079_552,
}  # gemma3_4b is the text model alone: its published 4.3 B include the vision tower
TWINS = ["llama3_2_1b", "qwen2_5_7b", "qwen3_8b", "mistral_7b", "gemma2_9b", "gemma3_4b", "phi3_mini"]
SHRINK = ["model.dtype=float32", "model.config.hidden_size=64", "model.config.intermediate_size=128",
          "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
          "model.config.vocab_size=256", "++model.config.head_dim=16", "++model.config.pad_token_id=0"]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_every_preset_has_its_published_parameter_count(preset):
    cfg = compose([f"model={preset}", "tracking=none"]).cfg
    with torch.device("meta"):
        model = build_model(cfg.model, torch.device("meta"), 0)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[preset]
    # and the job's config is left as given: transformers writes rope_theta into the rope_scaling dict it is
    # handed, which once put a phantom swept key into a sweep's report (job 0's config differed)
    assert cfg.model == compose([f"model={preset}", "tracking=none"]).cfg.model


@pytest.mark.parametrize("preset", TWINS)
def test_a_shrunken_twin_of_each_architecture_trains_on_cpu_predicted_exactly(preset):
    result = run_job(compose([*FAST, "tracking=none", f"model={preset}", *SHRINK, "memory=ckpt"]))
    assert result.status == "ok", result.error
    assert "prediction_error" not in result.environment
    for name in ("peak_memory_bytes", "param_bytes", "activation_bytes", "logits_bytes", "inference_peak_bytes"):
        assert result.metrics[f"predicted_{name}"] == result.metrics[name], name
    adapted = result.environment["lora_resolved_targets"].split(",")
    fused = preset == "phi3_mini"
    assert adapted == (["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] if fused else
                       ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert ("formula_peak_memory_bytes" in result.metrics) == (not fused)  # the formula counts separate q, k, v


# Other families than the presets', from a config.json (no Llama field names in GPT-2's)
FAMILIES = {
    "gpt2": {"n_embd": 64, "n_layer": 3, "n_head": 2, "vocab_size": 256, "n_positions": 256},
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 128,
                 "vocab_size": 256},
    # multi-query: one K/V head that SDPA broadcasts (math on CPU), K and V split off with list indices; tied
    "falcon": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "vocab_size": 256},
}


# bf16-true: a LayerNorm's saved mean and rstd are bf16 on CPU (fp32 from the meta kernel, as on CUDA)
@pytest.mark.parametrize("family, precision", [*((f, "32-true") for f in sorted(FAMILIES)), ("falcon", "bf16-mixed"),
                                               ("gpt2", "bf16-true")])
def test_another_familys_config_json_is_measured_and_predicted_exactly_without_the_formula(family, precision,
                                                                                             tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": family, **FAMILIES[family]}))
    measured = run_job(compose([*FAST, "tracking=none", f"model.config_path={tmp_path}",
                                f"trainer.precision={precision}"]))
    assert measured.status == "ok", measured.error
    assert "prediction_error" not in measured.environment
    assert measured.metrics["predicted_peak_memory_bytes"] == measured.metrics["peak_memory_bytes"]
    assert not any(name.startswith("formula_") for name in measured.metrics)  # not Llama's seven linears
    predicted = run_job(compose([*FAST, "tracking=none", f"model.config_path={tmp_path}", "mode=predict",
                                 f"trainer.precision={precision}"]))
    assert predicted.status == "ok", predicted.error
    assert predicted.metrics["predicted_peak_memory_bytes"] == measured.metrics["peak_memory_bytes"]


@pytest.fixture
def own_config(tmp_path):
    shape = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(shape))
    return tmp_path


@pytest.mark.parametrize("mode", ["measure", "predict"])
def test_a_users_config_json_builds_that_shape(own_config, mode):
    for path in (own_config, own_config / "config.json"):  # the folder or the file
        result = run_job(compose([*FAST, "tracking=none", f"model.config_path={path}", f"mode={mode}"]))
        assert result.status == "ok", result.error
        embedding = 256 * 64  # tied: counted once
        layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
        assert result.metrics["frozen_params"] == embedding + 2 * layer + 64
        if mode == "measure":
            assert result.metrics["predicted_peak_memory_bytes"] == result.metrics["peak_memory_bytes"]


def test_a_broken_config_json_is_one_line_naming_the_file_and_the_field(tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0}))
    assert problems_of([f"model.config_path={file}", "tracking=none"]) == [
        f"{file}: field num_attention_heads must be a positive integer, got 0"]
    file.write_text("{not json")
    (problem,) = problems_of([f"model.config_path={file}", "tracking=none"])
    assert problem.startswith(f"model.config_path '{file}' is not JSON:")
    file.write_text(json.dumps({"hidden_size": 64}))
    (problem,) = problems_of([f"model.config_path={file}", "tracking=none"])
    assert problem.startswith(f"model.config_path '{file}' must hold a Hugging Face config with a string model_type")
    assert problems_of([f"model.config_path={tmp_path / 'none'}", "tracking=none"]) == [
        f"model.config_path must be a config.json file or a folder holding one, got '{tmp_path / 'none'}'"]
    file.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3}))
    assert problems_of([f"model.config_path={file}", "tracking=none"]) == [  # the file's fields, not model.config's
        f"{file}: field num_attention_heads must divide field hidden_size=64 (or set field head_dim), got 3"]


def test_an_unknown_model_type_is_one_short_line(tmp_path):
    from sweepbp.config import ConfigError

    file = tmp_path / "config.json"
    file.write_text(json.dumps({"model_type": "foobar", "hidden_size": 64}))
    with pytest.raises(ConfigError) as raised:  # transformers lists every model type it knows (12 kB)
        hf_config(compose([f"model.config_path={file}", "tracking=none"]).cfg.model)
    assert raised.value.problems == [f"model.config_path '{file}' is not a valid config: Unrecognized model "
                                     "identifier: foobar (not a model_type this transformers version knows)"]


def test_a_model_read_from_a_file_records_the_files_shape(tmp_path):
    """The preset's or the command line's model.config does not apply to a config.json model: the job's config
    (params, results.json, checks) holds the file's fields, and pre-flight says the override has no effect."""
    from sweepbp.cli.precheck import notes

    file = tmp_path / "config.json"
    shape = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}
    file.write_text(json.dumps(shape))
    overrides = ["model=llama3_8b", f"model.config_path={file}", "model.config.num_hidden_layers=8", "tracking=none"]
    model = compose(overrides).cfg.model
    assert model.arch == "mistral" and model.config == {k: v for k, v in shape.items() if k != "model_type"}
    assert notes(overrides) == ["model.config.num_hidden_layers=8 has no effect with model.config_path (its "
                                "config.json is the shape; the job records that file's fields as model.arch and "
                                "model.config.*)"]
    # checks see the file's shape: its 100 token ids cannot hold data=text's bytes
    text = tmp_path / "corpus.txt"
    text.write_text("some text " * 50)
    assert problems_of([f"model.config_path={file}", "data=text", f"data.path={text}", "batch.seq_len=32",
                        "tracking=none"]) == [
        "model.config.vocab_size must be at least 256 with data=text (its token ids are the text's bytes, 0-255), "
        "got 100"]


@pytest.mark.parametrize("overrides, message", [
    (["model=phi3_mini", "lora=attn"], "lora.target_modules must be all-linear or names of phi3's linear layers "
                                       "(qkv_proj, o_proj, gate_up_proj, down_proj), got ['q_proj', 'k_proj', 'v_proj']"),
    (["model=gemma2_9b", "model.attn_implementation=sdpa"], "model.attn_implementation must be eager for gemma2"),
    (["+model.config.pad_token_id=600"], "model.config.pad_token_id must be below model.config.vocab_size=512, got 600"),
    (["model.config.num_hidden_layers=0"], "model.config.num_hidden_layers must be a positive integer, got 0"),
])
def test_what_a_model_cannot_do_is_one_line(overrides, message):
    problems = problems_of(["tracking=none", "mode=predict", *overrides])
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_eager_attention_at_a_long_sequence_is_a_note_with_the_size_of_its_scores():
    from sweepbp.cli.precheck import precheck
    from sweepbp.config import register_schemas

    register_schemas()
    said: list[str] = []
    problems, jobs = precheck(["model=gemma2_9b", "batch.size=1", "batch.seq_len=4096", "mode=predict",
                               "tracking=none"], notes=said)
    assert problems == [] and jobs == 1
    # 1 x 16 heads x 4096^2 x (4 + 2) bytes: the fp32 softmax and its bf16 cast
    assert said == ["model.attn_implementation=eager at batch.seq_len=4096 keeps (batch, heads, seq, seq) attention "
                    "scores: about 1.6 GB per layer at batch.size=1 (mode=predict gives the whole step)"]
    said.clear()
    precheck(["model=gemma2_9b", "batch.seq_len=1024", "mode=predict", "tracking=none"], notes=said)
    assert said == []


def test_a_checkpoint_stored_in_another_dtype_than_model_dtype_is_a_note(tmp_path):
    import torch
    from conftest import FAST, compose

    from sweepbp.cli.precheck import WEIGHT_BYTES, precheck
    from sweepbp.config import register_schemas
    from sweepbp.config.schema import DTYPES
    from sweepbp.train.model import build_model

    assert set(WEIGHT_BYTES) == set(DTYPES)
    stored = build_model(compose([*FAST, "model.dtype=bfloat16"]).cfg.model, torch.device("cpu"), seed=0)
    stored.save_pretrained(tmp_path / "ckpt")  # transformers writes the weights' dtype into config.json
    register_schemas()
    said: list[str] = []
    problems, _ = precheck([*FAST, f"model.pretrained_path={tmp_path / 'ckpt'}", "tracking=none"], notes=said)
    assert problems == []
    assert said == ["model.pretrained_path's config.json says dtype bfloat16 but model.dtype=float32: the weights "
                    "are built in float32 (4 bytes a weight instead of 2); add model.dtype=bfloat16 to train them "
                    "as stored"]
    said.clear()
    precheck([*FAST, f"model.pretrained_path={tmp_path / 'ckpt'}", "model.dtype=bfloat16", "tracking=none"],
             notes=said)
    assert said == []
