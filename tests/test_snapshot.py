"""snapshot=true: memory snapshots in PyTorch's format whose replay gives the tracker's peak exactly.

The peak is replayed the way PyTorch's viewer draws its Active Memory Timeline (`process_alloc_data` in
torch/utils/viz/MemoryViz.js, which pytorch.org/memory_viz and the pages of torch.cuda._memory_viz load):
torch's Python side (`_memory_viz`) has no replay of its own, so `viewer_peak` below follows that
function step for step; `_memory_viz` checks the segments and makes the page.
"""

from __future__ import annotations

import base64
import json
import pickle
import pickletools
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, run_cli
from torch.cuda import _memory_viz

from sweepbp.job import run_job
from sweepbp.measure.snapshot import PAGE_FILE, SNAPSHOT_FILE, SnapshotLog
from sweepbp.measure.tracker import GRAD, OTHER, TRAINABLE, MemoryTracker
from sweepbp.result import JobResult, Status

# The pickle opcodes MemoryViz.js's own unpickler reads (its `unpickleData`); any other stops the viewer.
VIEWER_OPCODES = {"PROTO", "APPEND", "APPENDS", "LIST", "TUPLE", "NEWFALSE", "NEWTRUE", "NONE", "BINGET", "BININT",
                  "BININT1", "BININT2", "EMPTY_DICT", "EMPTY_LIST", "FRAME", "LONG1", "LONG_BINGET", "MARK",
                  "MEMOIZE", "BINPUT", "LONG_BINPUT", "SETITEMS", "SETITEM", "DICT", "SHORT_BINUNICODE",
                  "BINUNICODE", "STOP", "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "BINFLOAT"}


def viewer_peak(snapshot: dict, device: int = 0) -> int:
    """The top of the viewer's Active Memory Timeline (`max_size` of MemoryViz.js's `process_alloc_data`).

    As the viewer does: a free_requested directly followed by its free_completed is one free
    (`annotate_snapshot`); a free without an alloc, and an active block at the end without one, were
    allocated before the trace; blocks lie one after another from their segment's address; the maximum is
    taken after each alloc or free."""
    events: list[dict] = []
    for event in snapshot["device_traces"][device]:
        last = events[-1] if events else None
        if event["action"] == "free_completed" and last and last["action"] == "free_requested" \
                and last["addr"] == event["addr"]:
            events[-1] = {**last, "action": "free"}
        else:
            events.append(event)
    sizes: list[int] = []  # the viewer's `elements`, by size
    initially: list[int] = []
    actions: list[int] = []
    open_allocs: dict[int, int] = {}
    for event in events:
        if event["action"] == "alloc":
            sizes.append(event["size"])
            open_allocs[event["addr"]] = len(sizes) - 1
            actions.append(len(sizes) - 1)
        elif event["action"] in ("free", "free_completed"):
            if event["addr"] in open_allocs:
                actions.append(open_allocs.pop(event["addr"]))
            else:
                sizes.append(event["size"])
                initially.append(len(sizes) - 1)
                actions.append(len(sizes) - 1)
    for segment in snapshot["segments"]:
        if segment["device"] != device:
            continue
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "active_allocated" and address not in open_allocs:
                sizes.append(block["requested_size"])
                initially.append(len(sizes) - 1)
            address += block["size"]
    live, total, peak = set(initially), sum(sizes[i] for i in initially), 0
    for element in actions:  # first sight of an element allocates it, the second frees it
        total += -sizes[element] if element in live else sizes[element]
        live ^= {element}
        peak = max(peak, total)
    return peak


def assert_viewer_unpickles(data: bytes) -> None:
    """MemoryViz.js's unpickler takes protocols 2 to 4 and the opcodes it knows."""
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ops[0][0] == "PROTO" and 2 <= ops[0][1] <= 4
    assert {name for name, _ in ops} <= VIEWER_OPCODES


def check_viewer_reads(folder: Path) -> dict:
    """The snapshot in `folder`, checked as the viewer and torch's `_memory_viz` read it; returns it."""
    data = (folder / SNAPSHOT_FILE).read_bytes()
    assert_viewer_unpickles(data)
    snapshot = pickle.loads(data)
    assert "total_allocated" in _memory_viz.segsum(snapshot)  # asserts that the blocks tile their segment
    # the page is torch's own, around the same snapshot
    page = (folder / PAGE_FILE).read_text()
    assert "MemoryViz.js" in page and "Active Memory Timeline" in page
    embedded = base64.b64decode(json.loads(page.split("const local_files = ", 1)[1].split("\n", 1)[0])[0]["base64"])
    assert_viewer_unpickles(embedded)
    assert pickle.loads(embedded) == snapshot
    return snapshot


def frames_of(snapshot: dict, action: str = "alloc") -> list[dict[str, str]]:
    return [{f["filename"]: f["name"] for f in event["frames"]}
            for event in snapshot["device_traces"][0] if event["action"] == action]


def test_snapshot_log_of_a_hand_built_step_is_every_event_in_order():
    weight = torch.nn.Parameter(torch.randn(32, 64))
    x = torch.randn(8, 64)
    log = SnapshotLog()
    tracker = MemoryTracker("cpu", budget_bytes=100_000, log=log)
    tracker.register([weight], TRAINABLE)
    tracker.register([x], OTHER)
    with pytest.raises(torch.OutOfMemoryError), tracker, tracker.phase_of("backward"):
        y = x @ weight.t()
        loss = (y * y).sum()
        loss.backward()
        tracker.retag(weight.grad, GRAD)
        torch.zeros(100_000)  # over the budget: the last event
    snapshot = log.snapshot()
    peak = tracker.report().peak_bytes
    actions = [(e["action"], e["size"]) for e in snapshot["device_traces"][0]]
    # y, y*y, the sum; y*y freed (sum does not keep it) ...; the refused 400,000 bytes
    assert actions[:5] == [("alloc", 1024), ("alloc", 1024), ("alloc", 4), ("free_requested", 1024),
                           ("free_completed", 1024)]
    assert actions[-2:] == [("alloc", 400_000), ("oom", 400_000)]
    assert snapshot["device_traces"][0][-1]["device_free"] == 100_000 - (peak - 400_000)
    assert viewer_peak(snapshot) == peak
    # the gradient's frames name its new category; weight and x were there before: blocks, not events
    assert {"op": "aten.mm.default", "module": "-", "category": GRAD, "phase": "backward"} in frames_of(snapshot)
    assert sum(e["action"] == "alloc" and e["size"] == 32 * 64 * 4 for e in snapshot["device_traces"][0]) == 1


def test_cli_writes_snapshots_that_replay_to_the_exact_peak_and_logs_them(tmp_path, store):
    """The measured CPU job and the prediction, from the command line, read back through MLflow."""
    from mlflow import MlflowClient

    done = run_cli(["-m", "mode=measure,predict", "snapshot=true", "memory=ckpt", *FAST, f"tracking.uri={store}"],
                   cwd=tmp_path, check=True)
    client = MlflowClient(store)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("sweepbp").experiment_id])
            if r.data.tags.get("sweepbp.role") != "sweep"]
    assert sorted(r.data.tags["sweepbp.mode"] for r in runs) == ["measure", "predict"], done.stderr[-2000:]
    for run in runs:
        assert {SNAPSHOT_FILE, PAGE_FILE} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        folder = Path(client.download_artifacts(run.info.run_id, SNAPSHOT_FILE)).parent
        client.download_artifacts(run.info.run_id, PAGE_FILE, str(folder))
        snapshot = check_viewer_reads(folder)
        prefix = "predicted_" if run.data.tags["sweepbp.mode"] == "predict" else ""
        assert viewer_peak(snapshot) == run.data.metrics[f"{prefix}peak_memory_bytes"]
        assert run.data.metrics["snapshot_time_s"] > 0
        allocs = frames_of(snapshot)
        # checkpointing's recompute runs in the backward inside its layer, and is named after it
        assert any(f["phase"] == "backward" and f["category"] == "activation"
                   and f["module"].startswith("model.layers.1.") for f in allocs)
        assert any(f["module"] == "model.layers.0.mlp.down_proj.lora_A.default" for f in allocs)
        state = [{f["filename"]: f["name"] for f in b["frames"]}.get("state")
                 for b in snapshot["segments"][0]["blocks"] if b["state"] == "active_allocated"]
        assert {"model.layers.0.mlp.down_proj.base_layer.weight", "batch.input_ids",
                "model.layers.0.mlp.down_proj.lora_A.default.weight.exp_avg"} <= set(state)
        if not prefix:
            measured = run.data.metrics["peak_memory_bytes"]

    # snapshot=true changes nothing measured: the same job without it, in this process
    plain = compose(["memory=ckpt", *FAST, "tracking=none"])
    result = run_job(plain, output_dir=tmp_path / "plain")
    assert result.status == "ok", result.error
    assert result.metrics["peak_memory_bytes"] == measured
    assert result.artifacts == [] and not (tmp_path / "plain").exists()
    with_snapshot = compose(["memory=ckpt", *FAST, "tracking=none", "snapshot=true"])
    assert JobResult.of(plain, Status.RUNNING).config_hash == JobResult.of(with_snapshot, Status.RUNNING).config_hash


def test_llama3_8b_prediction_snapshot_replays_to_the_predicted_peak(tmp_path):
    run = compose(["mode=predict", "model=llama3_8b", "snapshot=true", "trainer.accelerator=gpu", "tracking=none"])
    result = run_job(run, output_dir=tmp_path)
    assert result.status == "ok", result.error
    assert result.artifacts == [SNAPSHOT_FILE, PAGE_FILE]
    snapshot = check_viewer_reads(tmp_path)
    assert viewer_peak(snapshot) == result.metrics["predicted_peak_memory_bytes"] > 16e9
    modules = {f["module"] for f in frames_of(snapshot)}
    assert {"model.layers.31.mlp.down_proj.base_layer", "lm_head", "model.embed_tokens"} <= modules
    assert {f["phase"] for f in frames_of(snapshot)} == {"forward", "loss", "backward", "optim"}


def test_a_datasets_accumulated_worst_step_snapshots_to_the_measured_peak(tmp_path, data_files):
    """A dataset under batch.accumulate: the step's batch is a list of padded micro-batches, each named."""
    from test_predict import data_overrides

    run = compose([*FAST, "tracking=none", "data=jsonl", *data_overrides("jsonl", data_files), "snapshot=true"])
    result = run_job(run, output_dir=tmp_path)
    assert result.status == "ok", result.error
    snapshot = check_viewer_reads(tmp_path)
    assert viewer_peak(snapshot) == result.metrics["peak_memory_bytes"] == result.metrics["predicted_peak_memory_bytes"]
    blocks = [b for segment in snapshot["segments"] for b in segment["blocks"]]
    states = {f["name"] for b in blocks for f in b["frames"] if f["filename"] == "state"}
    assert {"batch.0.input_ids", "batch.1.input_ids"} <= states


def allocations(snapshot: dict) -> int:
    return sum(e["action"] == "alloc" for trace in snapshot["device_traces"] for e in trace)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_job_writes_the_allocators_snapshot_of_the_traced_step_alone(tmp_path):
    """Written after torch's documented API; not yet run on a GPU (docs/snapshot.md)."""
    cpu = run_job(compose([*FAST, "snapshot=true", "tracking=none", "trainer.accelerator=cpu"]),
                  output_dir=tmp_path / "cpu")
    cuda = run_job(compose([*FAST, "snapshot=true", "tracking=none", "trainer.accelerator=gpu"]),
                   output_dir=tmp_path / "cuda")
    assert cpu.status == cuda.status == "ok", cuda.error
    snapshot = check_viewer_reads(tmp_path / "cuda")
    # one step's allocations, as the tracker saw on CPU; with the timed steps it would be twice as many or more
    assert 0.5 < allocations(snapshot) / allocations(pickle.loads((tmp_path / "cpu" / SNAPSHOT_FILE).read_bytes())) < 1.5
    assert any(f["filename"].endswith(".py") for trace in snapshot["device_traces"] for e in trace
               for f in e.get("frames", []))  # the allocator's Python stacks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_memory_keeps_the_snapshot_up_to_the_refused_allocation(tmp_path):
    # inference (about 0.6 GB) fits, the first training step (about 2.1 GB, predicted) does not
    result = run_job(compose([*FAST, "snapshot=true", "tracking=none", "trainer.accelerator=gpu", "batch.size=16",
                              "batch.seq_len=1024", "budget_gb=1.2"]), output_dir=tmp_path)
    assert result.status == "oom", result.error
    snapshot = pickle.loads((tmp_path / SNAPSHOT_FILE).read_bytes())
    assert any(e["action"] == "oom" for trace in snapshot["device_traces"] for e in trace)
