"""mode=predict: the data-less trace equals the measurement on CPU, maps Llama-3.1-8B in seconds, and
batch.size=auto finds the exact fitting boundary."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import FAST, compose

from sweepbp.cli.precheck import available_options
from sweepbp.config import PRECISIONS
from sweepbp.job import run_job
from sweepbp.measure.tracker import MemoryTracker
from sweepbp.metrics import CATALOGUE
from sweepbp.predict.autobatch import BatchSearch, largest_fitting
from sweepbp.predict.estimate import estimate
from sweepbp.predict.target import CpuMetaTracker, cpu_sdpa_backend, sdpa
from sweepbp.predict.trace import predict
from sweepbp.train.model import hf_config

# Every memory figure the catalogue says a prediction also gives (predicted_<name>).
MEASURED = [m.name for m in CATALOGUE if m.predicted and m.unit == "bytes"]
assert {"peak_memory_bytes", "activation_bytes", "host_offload_bytes", "inference_peak_bytes"} <= set(MEASURED)


def assert_prediction_exact(metrics: dict[str, float]) -> None:
    for name in MEASURED:
        assert metrics[f"predicted_{name}"] == metrics[name], name
    assert metrics["predicted_error_pct"] == 0.0
    assert metrics["predicted_inference_error_pct"] == 0.0


@pytest.mark.parametrize("strategy", available_options("memory"))
def test_measured_run_logs_an_exact_prediction_for_every_strategy(strategy):
    result = run_job(compose([*FAST, "tracking=none", f"memory={strategy}"]))
    assert result.status == "ok", result.error
    assert "prediction_error" not in result.environment
    assert result.environment["predicted_device"] == "cpu"
    assert_prediction_exact(result.metrics)
    assert result.metrics["predict_time_s"] > 0
    # the strategy acted in the measured step itself (equal to a prediction that also lacked it would pass)
    assert (result.metrics["host_offload_bytes"] > 0) == ("offload" in strategy)
    assert (result.metrics["checkpointed_layers"] > 0) == (strategy in ("ckpt", "selective", "ckpt_offload"))


@pytest.mark.parametrize("memory", ["none", "ckpt"])
@pytest.mark.parametrize("loss", available_options("loss"))
def test_measured_run_logs_an_exact_prediction_for_every_loss(loss, memory):
    if loss == "liger":
        pytest.skip("loss=liger runs on CUDA only and is not predicted (a pre-flight error says so)")
    result = run_job(compose([*FAST, "tracking=none", f"loss={loss}", f"memory={memory}",
                              "trainer.precision=bf16-true"]))  # bf16: the loss's fp32 upcast is a real copy
    assert result.status == "ok", result.error
    assert_prediction_exact(result.metrics)
    assert result.metrics["logits_bytes"] > 0


@pytest.mark.parametrize("memory", ["none", "ckpt"])
@pytest.mark.parametrize("quant", available_options("quant"))
def test_measured_run_logs_an_exact_prediction_for_every_quant(quant, memory):
    if quant != "none":
        pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    result = run_job(compose([*FAST, "tracking=none", f"quant={quant}", f"memory={memory}", "model.dtype=bfloat16"]))
    assert result.status == "ok", result.error
    assert_prediction_exact(result.metrics)
    assert (result.metrics["quant_state_bytes"] > 0) == (quant != "none")


@pytest.mark.parametrize("group, option", [(g, o) for g in ("method", "optim") for o in available_options(g)])
def test_measured_run_logs_an_exact_prediction_for_every_method_and_optimizer(group, option):
    if option == "paged_adamw8bit":
        pytest.skip("paged_adamw8bit needs CUDA and is not predicted (a pre-flight error says so)")
    if option == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    result = run_job(compose([*FAST, "tracking=none", f"{group}={option}", "memory=ckpt", "batch.accumulate=2"]))
    assert result.status == "ok", result.error
    assert_prediction_exact(result.metrics)


@pytest.mark.parametrize("optim", ["adafactor", "adamw8bit"])
def test_an_optimizer_that_reads_a_scalar_is_predicted_exactly_under_autocast(optim):
    """Adafactor reads each weight's RMS with .item(), bitsandbytes' 8-bit AdamW a scalar of its own: under
    *-mixed precision the trace's tensors are fake CPU tensors, whose .item() has no value to give."""
    if optim == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="the .[quant] extra (CI installs it)")
    result = run_job(compose([*FAST, "tracking=none", f"optim={optim}", "trainer.precision=bf16-mixed"]))
    assert result.status == "ok", result.error
    assert "prediction_error" not in result.environment, result.environment.get("prediction_error")
    assert_prediction_exact(result.metrics)


@pytest.mark.parametrize("overrides", [
    ["model.attn_implementation=eager", "trainer.precision=bf16-true", "memory=ckpt", "memory.every=2",
     "lora=attn", "batch.seq_len=33"],
    ["trainer.precision=bf16-mixed"],  # autocast: traced on fake CPU tensors instead of meta
    ["trainer.precision=bf16-mixed", "loss=fused", "memory=offload"],  # the fused loss under autocast, offloaded
    # tied embeddings (Llama-3.2 1B/3B, Gemma) under autocast: the fake CPU copy of the model keeps the tie
    ["trainer.precision=bf16-mixed", "++model.config.tie_word_embeddings=true"],
], ids=["eager-bf16true-every2-attn", "bf16-mixed", "bf16-mixed-fused-offload", "bf16-mixed-tied"])
def test_prediction_is_exact_beyond_the_defaults(overrides):
    result = run_job(compose([*FAST, "tracking=none", *overrides]))
    assert result.status == "ok", result.error
    assert_prediction_exact(result.metrics)


def data_overrides(option: str, files) -> list[str]:
    """One case per shipped data option (a new option needs one here), with files made by tests/datafiles.py."""
    return {
        # shuffled examples, each micro-batch padded to its longest row; the worst step's first micro-batch is
        # padded (a mask: SDPA off its causal kernel, K/V repeated), its second is not (a mask of ones, dropped)
        "jsonl": [f"data.path={files.jsonl}", f"data.tokenizer_path={files.tokenizer}", "batch.seq_len=48",
                  "batch.accumulate=2"],
        # chat messages by the tokenizer's template, longest first, padded to batch.seq_len, eager attention:
        # the worst batch is two truncated rows, a mask without padding
        "parquet": [f"data.path={files.parquet}", "data.text_field=messages", f"data.tokenizer_path={files.tokenizer}",
                    "data.order=longest_first", "data.pad_to=max_length", "batch.seq_len=48",
                    "model.attn_implementation=eager", "memory=ckpt"],
    }[option]


@pytest.mark.parametrize("option", available_options("data"))
def test_measured_run_logs_an_exact_prediction_for_every_data_option(option, data_files):
    """A dataset's traced step is its epoch's worst batch, padded: the prediction plans and traces the same one."""
    if option in ("synthetic", "text"):  # one full-length unpadded row per sequence: the step the others trace
        pytest.skip(f"data={option}: every other test of this file runs that step (data=synthetic)")
    result = run_job(compose([*FAST, "tracking=none", f"data={option}", *data_overrides(option, data_files)]))
    assert result.status == "ok", result.error
    assert_prediction_exact(result.metrics)
    assert result.metrics["padding_fraction"] > 0
    if option == "jsonl":  # the traced step holds padding
        assert result.metrics["worst_batch_tokens"] < 2 * 2 * 48
    if option == "parquet":  # two truncated rows: a mask of ones, which transformers drops
        assert result.metrics["worst_batch_tokens"] == 2 * 48


def test_predict_mode_records_the_prediction_and_its_target():
    result = run_job(compose([*FAST, "tracking=none", "mode=predict", "memory=ckpt"]))
    assert result.status == "ok", result.error
    assert result.mode == "predict"
    assert result.environment["predicted_device"] == "cpu"
    assert "flash" in result.environment["predicted_kernels"]
    assert result.metrics["predicted_peak_memory_bytes"] > result.metrics["predicted_inference_peak_bytes"] > 0
    assert "peak_memory_bytes" not in result.metrics  # nothing was measured
    assert result.metrics["checkpointed_layers"] == 4
    assert result.timeline and {s["phase"] for s in result.timeline} >= {"forward", "backward", "optim"}
    assert result.metrics["formula_peak_memory_bytes"] > 0


@pytest.mark.parametrize("option", ["quant=nf4", "quant=int8", "method=dora", "method=full", "optim=adamw8bit",
                                    "optim=adafactor", "optim=sgd", "memory=selective", "memory=offload"])
def test_the_formula_is_absent_for_what_it_does_not_model(option):
    """LoRA with AdamW on unquantised weights is all the closed form counts: for 8B nf4 it gave 20.1 GB against
    a traced 12.3 GB, for full fine-tuning 20.1 GB against 80.3 GB. No figure rather than a wrong one."""
    cfg = compose(["model=llama3_1_8b", "mode=predict", "tracking=none", option]).cfg
    linears = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert estimate(cfg, hf_config(cfg.model), 1, linears) is None
    default = compose(["model=llama3_1_8b", "mode=predict", "tracking=none"]).cfg
    assert estimate(default, hf_config(cfg.model), 1, linears)
    assert estimate(default, hf_config(cfg.model), 1, ["qkv_proj", *linears]) is None  # a layer it does not count


def test_predict_mode_over_budget_is_an_oom_result_with_its_figures():
    result = run_job(compose([*FAST, "tracking=none", "mode=predict", "budget_gb=0.001"]))
    assert result.status == "oom"
    assert "exceeds budget_gb=0.001" in result.error
    assert result.metrics["predicted_peak_memory_bytes"] > 1e6


def llama31_8b_parameters() -> int:
    """Llama-3.1-8B's parameter count from its published config (hidden 4096, MLP 14336, 32 layers,
    32 heads of 128, 8 KV heads, vocabulary 128256, untied embeddings)."""
    h, i, layers, vocab, kv = 4096, 14336, 32, 128256, 8 * 128
    attention = h * h + 2 * h * kv + h * h
    mlp = 3 * h * i
    norms = 2 * h
    return 2 * vocab * h + layers * (attention + mlp + norms) + h


def test_llama3_8b_predicts_on_cpu_with_exact_weights():
    assert llama31_8b_parameters() == 8_030_261_248
    cfg = compose(["model=llama3_8b", "mode=predict", "lora.r=16", "batch.size=1", "batch.seq_len=2048"]).cfg
    prediction = predict(cfg, "cuda")
    metrics = prediction.metrics()
    rotary = 2 * 64 * 4  # inv_freq and original_inv_freq buffers: head_dim / 2 fp32 values each
    assert metrics["predicted_param_bytes"] == 2 * llama31_8b_parameters() + rotary  # bf16 weights
    adapter = 16 * sum(n_in + n_out for n_in, n_out in
                       [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336),
                        (14336, 4096)])
    assert metrics["predicted_trainable_param_bytes"] == 32 * adapter * 4  # peft keeps bf16 models' adapters fp32
    assert metrics["predicted_grad_bytes"] == metrics["predicted_trainable_param_bytes"]
    assert "attention: the cuda dispatcher's flash SDPA kernel" in prediction.modelled
    assert "optimizer: AdamW foreach (the CUDA default)" in prediction.modelled
    # bf16 LoRA step at seq 2048 on a GPU: weights (16.1 GB) + saved activations + fp32 loss; far below 8B x 16 bytes
    assert 16.1e9 < prediction.inference_peak_bytes < prediction.report.peak_bytes < 60e9


def test_cuda_prediction_saves_what_cuda_attention_saves():
    """fp32 attention: CPU runs its flash kernel (logsumexp of L per head), CUDA the memory-efficient one,
    whose logsumexp is padded to a multiple of 32 in L (33 -> 64); with grouped KV heads CUDA has no fused
    fp32 kernel and falls back to math, which keeps the attention matrix."""
    plain = compose([*FAST, "batch.seq_len=33", "mode=predict", "model.config.num_key_value_heads=4"]).cfg
    cpu, cuda = predict(plain, "cpu"), predict(plain, "cuda")
    assert "attention: the cpu dispatcher's flash SDPA kernel" in cpu.modelled
    assert "attention: the cuda dispatcher's efficient SDPA kernel" in cuda.modelled
    layers, batch, heads = 4, 2, 4
    extra = layers * batch * heads * (64 - 33) * 4
    rng_scalars = layers * 2 * 8  # the kernel's int64 seed and offset (host memory on a GPU, counted here)
    assert cuda.report.category_peaks["activation"] - cpu.report.category_peaks["activation"] == extra + rng_scalars
    grouped = predict(compose([*FAST, "batch.seq_len=33", "mode=predict"]).cfg, "cuda")
    assert "attention: the cuda dispatcher's math SDPA kernel" in grouped.modelled
    probabilities, logsumexp = layers * batch * heads * 33 * 33 * 4, layers * batch * heads * 33 * 4
    grown = grouped.report.category_peaks["activation"] - cpu.report.category_peaks["activation"]
    assert grown == probabilities - logsumexp  # math keeps the (B, H, L, L) probabilities, not a logsumexp


@pytest.mark.parametrize("curve", [
    lambda b: 100 + 7 * b,  # affine, as activations are
    lambda b: 100 + b * b,  # convex
    lambda b: 100 + 50 * (b // 5),  # steps: the linear guess is wrong
])
@pytest.mark.parametrize("budget", [99, 107, 108, 500, 5_000])
def test_finder_returns_the_boundary(curve, budget):
    asked: list[int] = []

    def fits(b: int) -> bool:
        asked.append(b)
        return curve(b) <= budget

    expected = max([b for b in range(1, 2000) if curve(b) <= budget], default=0)
    assert largest_fitting(fits, curve, budget, limit=1999) == expected
    assert len(set(asked)) <= 30


def test_auto_batch_is_the_largest_that_fits_the_real_tracker():
    probe = compose([*FAST, "tracking=none", "mode=predict"])
    search = BatchSearch(probe, "cpu", budget=0)
    budget = (search.peak(3) + search.peak(4)) // 2  # batch 3 fits, batch 4 does not
    budget_gb = budget / 1e9
    auto = run_job(compose([*FAST, "tracking=none", "batch.size=auto", f"budget_gb={budget_gb}"]))
    assert auto.status == "ok", auto.error
    assert auto.metrics["auto_batch_size"] == 3
    assert auto.metrics["peak_memory_bytes"] <= budget < search.peak(4)
    assert auto.metrics["tokens_per_s"] > 0
    above = run_job(compose([*FAST, "tracking=none", "batch.size=4", f"budget_gb={budget_gb}"]))
    assert above.status == "oom", "the real tracker must refuse batch 4 under the same budget"



def _precision_behaviour(plugin) -> tuple:
    """What a precision plugin does to a module and inside a training step."""
    import copy

    import torch

    module = plugin.convert_module(copy.deepcopy(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))))
    with plugin.train_step_context():
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        inside = (torch.get_default_dtype(), autocast)
    return {p.dtype for p in module.parameters()}, inside, torch.get_default_dtype()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_trace_applies_the_precision_a_lightning_trainer_applies(precision):
    """mode=predict does not import Lightning: its precision (predict/target.py) is checked against the plugin a
    CPU Trainer picks for every trainer.precision; a CUDA target's trace differs only in the note on autocast."""
    import lightning as L
    import torch

    from sweepbp.predict.target import precision_plugin

    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    ours = _precision_behaviour(precision_plugin(precision, "cpu", []))
    assert ours == _precision_behaviour(trainer.precision_plugin)
    modelled: list[str] = []
    for_cuda = _precision_behaviour(precision_plugin(precision, "cuda", modelled))
    assert bool(modelled) == precision.endswith("-mixed")  # the trace's CPU autocast is noted
    if precision == "16-mixed":  # on CUDA it autocasts to float16 (on CPU Lightning makes it bf16-mixed)
        assert for_cuda[1] == (torch.float32, torch.float16)
    else:
        assert for_cuda == ours


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_attention_as_the_trace_runs_it_allocates_what_pytorchs_sdpa_does():
    """`target.sdpa` (the trace's attention) against `F.scaled_dot_product_attention` on real CPU tensors: the same
    ops, and the same live bytes after every allocation and free, for flash and math, with a bool mask (made
    additive as attention.cpp's convert_boolean_attn_mask does: `where`, no `logical_not`, its -inf scalar freed at
    once), an additive mask or none. A `logical_not` too many cost Falcon's full fine-tuning 4 bytes of its
    inference peak."""
    seq, dim = 8, 8
    for kv_heads, mask, dtype in itertools.product([1, 4], [None, "bool", "float"], [torch.float32, torch.bfloat16]):
        query = torch.randn(2, 4, seq, dim, dtype=dtype)
        key, value = (torch.randn(2, kv_heads, seq, dim, dtype=dtype) for _ in range(2))
        attn_mask = {None: None, "bool": torch.ones(2, 1, seq, seq, dtype=torch.bool).tril(),
                     "float": torch.zeros(2, 1, seq, seq, dtype=dtype)}[mask]
        runs = []
        for attention in (torch.nn.functional.scaled_dot_product_attention, functools.partial(sdpa, "cpu")):
            with _Ops() as ops, MemoryTracker("cpu", keep_timeline=True) as tracker:
                attention(query, key, value, attn_mask=attn_mask)
            runs.append((ops.names, [sum(sample.by_category.values()) for sample in tracker.timeline]))
        assert runs[0] == runs[1], (kv_heads, mask, dtype)
        assert runs[0][1], "nothing was allocated"


def test_a_cpu_targets_layer_norm_saves_what_the_cpu_kernel_makes():
    """CpuMetaTracker's `native_layer_norm` on meta tensors gives the outputs of the real CPU kernel: mean and rstd
    in the input's dtype, fp32 when the weight or bias has another (the meta kernel's are fp32 always, as CUDA's)."""
    for dtype, params in itertools.product([torch.float32, torch.bfloat16, torch.float16],
                                           [None, torch.float32, torch.bfloat16, torch.float16]):
        def run(device, by_name=False):
            weight = None if params is None else torch.ones(8, dtype=params, device=device)
            bias = None if params is None else torch.zeros(8, dtype=params, device=device)
            given = torch.ones(2, 3, 8, dtype=dtype, device=device)
            try:
                if by_name:
                    return torch.ops.aten.native_layer_norm(given, [8], weight=weight, bias=bias, eps=1e-5)
                return torch.ops.aten.native_layer_norm(given, [8], weight, bias, 1e-5)
            except RuntimeError:  # a combination the CPU kernel refuses
                return None

        real = run("cpu")
        if real is None:
            continue
        for by_name in (False, True):
            with CpuMetaTracker("meta"):
                traced = run("meta", by_name)
            assert [(t.shape, t.stride(), t.dtype) for t in traced] == [
                (t.shape, t.stride(), t.dtype) for t in real], (dtype, params, by_name)


def test_the_cpu_attention_backend_is_the_one_the_cpu_dispatcher_picks():
    """cpu_sdpa_backend against PyTorch's own choice on real CPU tensors, over batch and head broadcasting (Falcon's
    multi-query attention passes one K/V head without enable_gqa: math), grouped heads, masks, dropout, dtypes."""
    seq, dim, checked = 8, 8, 0
    for k_batch, q_heads, kv_heads, gqa, mask, dropout, dtype in itertools.product(
            [2, 1], [4], [1, 2, 4], [False, True], [None, "bool", "float"], [0.0, 0.1], [torch.float32, torch.bfloat16]):
        query = torch.randn(2, q_heads, seq, dim, dtype=dtype)
        key, value = (torch.randn(k_batch, kv_heads, seq, dim, dtype=dtype) for _ in range(2))
        attn_mask = {None: None, "bool": torch.ones(2, 1, seq, seq, dtype=torch.bool),
                     "float": torch.zeros(2, 1, seq, seq, dtype=dtype)}[mask]
        with _Ops() as ops:
            try:
                torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                                 dropout_p=dropout, enable_gqa=gqa)
            except RuntimeError:  # shapes SDPA refuses whatever the backend
                continue
        real = "flash" if any("flash" in name for name in ops.names) else "math"
        assert cpu_sdpa_backend(query, key, value, attn_mask, dropout, False, gqa) == real, (
            k_batch, q_heads, kv_heads, gqa, mask, dropout, dtype)
        checked += 1
    assert checked >= 80
    query = key = value = torch.randn(2, 4, seq, dim)
    for shape in [(2, 4, seq, seq), (1, 1, seq, seq), (2, 1, 1, seq), (seq, seq), (1, seq), (4, seq, seq)]:
        for needs_grad in (False, True):
            attn_mask = torch.zeros(shape, requires_grad=needs_grad)  # 3-D or a mask that trains: math
            with _Ops() as ops:
                torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
            real = "flash" if any("flash" in name for name in ops.names) else "math"
            assert cpu_sdpa_backend(query, key, value, attn_mask, 0.0, False) == real, (shape, needs_grad)
