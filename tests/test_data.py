"""Real data (data=jsonl|parquet): tokenized as the tokenizer does it, padded or packed as planned, the epoch's
worst batch traced, throughput counted in real tokens, mode=predict equal to the measurement, one-line errors."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import FAST, compose, problems_of, run_cli

from sweepbp.config import JsonlDataConfig
from sweepbp.job import run_job
from sweepbp.train.batching import make_plan, micro_batch_tensors
from sweepbp.train.data import DatasetBatches, token_counts
from sweepbp.train.dataset import length_metrics, load_tokenizer, tokenize_dataset

# Six examples of 1 to 5 tokens; with batch.size=2 and batch.seq_len=4, longest first:
# (11..15) and (7..10) truncated to 4 | (1, 2, 3) and (4, 5) | (16, 17) and (6,)
EXAMPLES = ((1, 2, 3), (4, 5), (6,), (7, 8, 9, 10), (11, 12, 13, 14, 15), (16, 17))


def plan(steps: int = 5, **fields):
    data = JsonlDataConfig(path="x.jsonl", order="longest_first", **fields)
    return make_plan(EXAMPLES, data, size=2, seq_len=4, accumulate=1, seed=0, steps=steps, warmup_steps=1)


def test_padded_rows_longest_first_and_the_worst_step_traced():
    padded = plan()
    assert [[m.rows for m in step] for step in padded.epoch] == [
        [((11, 12, 13, 14), (7, 8, 9, 10))], [((1, 2, 3), (4, 5))], [((16, 17), (6,))]]
    assert [step[0].width for step in padded.epoch] == [4, 3, 2]  # each padded to its own longest row
    assert padded.worst == 0 and padded.masked
    # warm-up: the first other step; then the worst (traced); then the rest spread evenly over the epoch
    assert padded.order == (1, 0, 1, 2, 2)
    batch = micro_batch_tensors(padded.epoch[1][0], pad_id=0, masked=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]  # padding is never a label
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert token_counts(batch) == (5, 6, 2)
    assert [m.width for step in plan(pad_to="max_length").epoch for m in step] == [4, 4, 4]


def test_packed_rows_are_the_joined_stream_cut_at_seq_len():
    packed = plan(packing=True)
    assert [[m.rows for m in step] for step in packed.epoch] == [  # 17 tokens: the last partial row dropped
        [((11, 12, 13, 14), (15, 7, 8, 9))], [((10, 1, 2, 3), (4, 5, 16, 17))]]
    assert not packed.masked
    batch = micro_batch_tensors(packed.epoch[0][0], pad_id=0, masked=False)
    assert set(batch) == {"input_ids", "labels"} and token_counts(batch) == (8, 8, 2)


def test_shuffle_is_seeded():
    data = JsonlDataConfig(path="x.jsonl")
    rows = [[m.rows for step in make_plan(EXAMPLES, data, 1, 8, 1, seed, 4, 1).epoch for m in step] for seed in (0, 0, 1)]
    assert rows[0] == rows[1] != rows[2]
    assert sorted(r for (r,) in rows[0]) == sorted(EXAMPLES)


def test_tokenized_by_the_tokenizer_its_chat_template_or_bytewise(data_files):
    tokenizer = load_tokenizer(str(data_files.tokenizer))
    text = compose(["data=jsonl", f"data.path={data_files.jsonl}", f"data.tokenizer_path={data_files.tokenizer}"])
    tokenized = tokenize_dataset(text.cfg.data, None)
    assert tokenized.examples[0] == (*tokenizer(data_files.texts[0])["input_ids"], tokenizer.eos_token_id)
    assert len(tokenized.examples) == len(data_files.texts) and tokenized.pad_id == tokenizer.pad_token_id
    lengths = [len(x) for x in tokenized.examples]
    assert length_metrics(tokenized.examples, 128) == {
        "examples": 64, "example_tokens_mean": statistics.fmean(lengths), "example_tokens_p50": statistics.median(lengths),
        "example_tokens_p95": statistics.quantiles(lengths, n=20, method="inclusive")[18],
        "example_tokens_max": max(lengths), "examples_over_seq_len": sum(n > 128 for n in lengths)}
    assert 0 < length_metrics(tokenized.examples, 128)["examples_over_seq_len"] < 64
    bytewise = tokenize_dataset(compose(["data=jsonl", f"data.path={data_files.jsonl}"]).cfg.data, None)
    assert bytewise.examples[0] == tuple(data_files.texts[0].encode()) and bytewise.vocab == 256
    chat = compose(["data=parquet", f"data.path={data_files.parquet}", "data.text_field=messages",
                    f"data.tokenizer_path={data_files.tokenizer}"])
    first = tokenize_dataset(chat.cfg.data, None).examples[0]
    rendered = f"<s> user {data_files.texts[0]} </s><s> assistant {data_files.texts[1]} </s>"
    assert first == tuple(tokenizer(rendered, add_special_tokens=False)["input_ids"])  # the template's markers only


SMALLER = ["trainer.steps=4", "trainer.warmup_steps=1", "batch.size=2", "batch.seq_len=64", "tracking=none"]  # than the defaults: test time


@pytest.fixture(scope="module")
def packing_sweep(data_files, tmp_path_factory):
    """The issue's command as typed (-m amid the overrides), in a folder holding train.jsonl and tok/."""
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "train.jsonl").write_bytes(data_files.jsonl.read_bytes())
    (folder / "tok").symlink_to(data_files.tokenizer)
    run_cli(["data=jsonl", "data.path=train.jsonl", "data.tokenizer_path=tok/", "-m", "data.packing=true,false",
             *SMALLER], cwd=folder, check=True)
    results = {}
    for path in folder.glob("multirun/*/*/*/results.json"):
        result = json.loads(path.read_text())
        results[result["config"]["data"]["packing"]] = result
    return folder, results


def test_packed_and_padded_jobs_count_real_tokens(packing_sweep):
    folder, results = packing_sweep
    packed, padded = results[True], results[False]
    assert (packed["status"], padded["status"]) == ("ok", "ok")
    assert packed["metrics"]["padding_fraction"] == 0.0 < padded["metrics"]["padding_fraction"]
    for result in (packed, padded):
        m = result["metrics"]
        assert m["predicted_error_pct"] == 0.0 and m["predicted_inference_error_pct"] == 0.0  # exact on CPU
        assert m["tokens_per_s"] == pytest.approx(m["padded_tokens_per_s"] * (1 - m["padding_fraction"]))
        assert m["examples"] == 64 and m["examples_over_seq_len"] > 0
    # the padded job's worst batch holds the longest (truncated) example; packed rows are always full
    assert padded["metrics"]["worst_batch_seq_len"] == packed["metrics"]["worst_batch_seq_len"] == 64
    # padding_fraction is exactly the padding of the planned timed steps
    run = compose(["data=jsonl", f"data.path={folder / 'train.jsonl'}", f"data.tokenizer_path={folder / 'tok'}",
                   *SMALLER])
    batches = DatasetBatches(run.cfg, 2, 512)
    timed = [token_counts(batches[i]) for i in range(run.cfg.trainer.warmup_steps + 1, len(batches))]
    assert padded["metrics"]["padding_fraction"] == 1 - sum(c[0] for c in timed) / sum(c[1] for c in timed)
    summary = next(folder.glob("multirun/*/*/summary.md")).read_text()
    assert "What each packing costs against data.packing=False" in summary


def test_predict_mode_gives_the_worst_batch_peak_measured(packing_sweep):
    folder, results = packing_sweep
    padded = results[False]["metrics"]
    run = compose(["data=jsonl", f"data.path={folder / 'train.jsonl'}", f"data.tokenizer_path={folder / 'tok'}",
                   *SMALLER, "mode=predict"])
    predicted = run_job(run)
    assert predicted.status == "ok", predicted.error
    assert predicted.metrics["predicted_peak_memory_bytes"] == padded["peak_memory_bytes"]
    assert predicted.metrics["worst_batch_tokens"] == padded["worst_batch_tokens"]


def test_dataset_problems_are_one_line_each(data_files, tmp_path):
    (tmp_path / "empty_tok").mkdir()
    (tmp_path / "bad_tok").mkdir()
    (tmp_path / "bad_tok" / "tokenizer.json").write_text("{not json")
    (tmp_path / "notes.jsonl").write_text("plain words\n")
    jsonl = ["data=jsonl", f"data.path={data_files.jsonl}"]
    cases = [
        (["data=jsonl", "data.path=missing.jsonl"],
         "data.path must be an existing local JSONL file (one JSON object per line), got 'missing.jsonl'"),
        ([*jsonl, "data.text_field=body"], "data.text_field must be a field of data.path's records (id, text), got 'body'"),
        (["data=parquet", f"data.path={data_files.parquet}"],
         "data.text_field must be a field of data.path's records (messages), got 'text'"),
        (["data=parquet", f"data.path={data_files.jsonl}"], f"data.path must be a Parquet file, got '{data_files.jsonl}'"),
        (["data=jsonl", f"data.path={tmp_path / 'notes.jsonl'}"], "(line 1 is not JSON"),
        ([*jsonl, f"data.tokenizer_path={tmp_path / 'empty_tok'}"], "none of those files in it"),
        ([*jsonl, f"data.tokenizer_path={tmp_path / 'bad_tok'}"], "tokenizer.json is not JSON"),
        ([*jsonl, "data.pad_to=shortest"], "data.pad_to must be longest or max_length, got 'shortest'"),
        ([*jsonl, "data.order=random"], "data.order must be shuffle or longest_first, got 'random'"),
        ([*jsonl, "data.name=parquet"], "data.name must be jsonl, the chosen option's own name"),
    ]
    for overrides, expected in cases:
        problems = problems_of(overrides)
        assert len(problems) == 1 and expected in problems[0], (overrides, problems)


def test_a_vocabulary_too_small_for_the_data_is_a_one_line_failure(data_files):
    result = run_job(compose([*FAST, "tracking=none", "mode=predict", "data=jsonl", f"data.path={data_files.jsonl}",
                              "model.config.vocab_size=128"]))
    assert result.status == "failed"
    assert result.error == ("ValueError: data=jsonl is tokenized into 256 ids (bytewise: no tokenizer): "
                            "model.config.vocab_size must be at least that, got 128")


def test_padding_positions_change_no_loss(data_files):
    """The loss of a padded batch is the loss of its rows alone: padding is masked and never a label."""
    from sweepbp.train.model import build_model

    run = compose([*FAST, "batch.seq_len=128", "data=jsonl", f"data.path={data_files.jsonl}",
                   f"data.tokenizer_path={data_files.tokenizer}"])
    model = build_model(run.cfg.model, torch.device("cpu"), 0)
    batches = DatasetBatches(run.cfg, 2, 512)
    batch = next(b for b in (batches[i] for i in range(len(batches))) if b["attention_mask"].min() == 0)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    with torch.no_grad():
        padded = model(**batch).loss
        rows = [model(input_ids=batch["input_ids"][i:i + 1, :n], labels=batch["labels"][i:i + 1, :n]).loss * (n - 1)
                for i, n in enumerate(lengths)]
    assert padded.item() == pytest.approx((sum(rows) / (sum(lengths) - len(lengths))).item(), rel=1e-5)


def test_pad_to_with_packing_is_a_note():
    from sweepbp.cli.precheck import notes

    assert notes(["data=jsonl", "data.packing=true", "data.pad_to=max_length"]) == [
        "data.pad_to=max_length has no effect with data.packing=true (packed rows are full: nothing is padded)"]
    assert notes(["data=jsonl", "data.packing=false", "data.pad_to=max_length"]) == []
