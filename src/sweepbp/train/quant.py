"""Quantised base weights (bitsandbytes): QLoRA's 4-bit NF4/FP4 and LLM.int8, one function per `quant.name`.

The modules quantised are the ones transformers' bitsandbytes integration quantises: every `nn.Linear`
of the model except the output projection (its default `modules_to_not_convert`), so the embeddings, the
norms and the head keep the model's dtype. Each linear becomes bitsandbytes' own `Linear4bit` /
`Linear8bitLt` and its weight is quantised by bitsandbytes itself (`Params4bit._quantize`,
`Int8Params._quantize`) on the job's device: on CPU through bitsandbytes' CPU backend, on CUDA through its
kernels, and on `meta` (mode=predict) through the shape-only implementations bitsandbytes registers for
its ops, so the packed weights and the quantisation state of a prediction have exactly the real shapes.

`quant.prepare` is peft's `prepare_model_for_kbit_training` (what peft's QLoRA examples call): every
parameter that is not quantised is cast to fp32 (about 2.1 GB more on an 8B model: embeddings and head).
Its gradient-checkpointing switch is left off: checkpointing is the `memory` group's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch

from sweepbp.config import QuantConfig
from sweepbp.train.model import DTYPES


def quantize_model(model: torch.nn.Module, quant: QuantConfig, device: torch.device) -> int:
    """Replace the linear layers by bitsandbytes' quantised ones (in place); returns how many."""
    if quant.name == "none":
        return 0
    import bitsandbytes as bnb  # the optional `.[quant]` extra: pre-flight says so when it is missing

    head = model.get_output_embeddings()
    count = 0
    _code_table_on_cpu()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child is not head:
                setattr(parent, name, _quantized(bnb, child, quant, device))
                count += 1
    # peft reads these to wrap the quantised layers with its bitsandbytes LoRA layers, as after a
    # from_pretrained(quantization_config=...)
    model.is_loaded_in_4bit = quant.name == "nf4"
    model.is_loaded_in_8bit = quant.name == "int8"
    if getattr(quant, "prepare", False):
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return count


def _quantized(bnb, linear: torch.nn.Linear, quant: QuantConfig, device: torch.device) -> torch.nn.Module:
    has_bias = linear.bias is not None
    if quant.name == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias,
                                  compute_dtype=DTYPES[quant.compute_dtype],  # type: ignore[attr-defined]
                                  compress_statistics=quant.double_quant,  # type: ignore[attr-defined]
                                  quant_type=quant.quant_type, device="meta")  # type: ignore[attr-defined]
        weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=quant.double_quant,
                                   quant_type=quant.quant_type, module=layer)  # type: ignore[attr-defined]
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                    threshold=quant.threshold, device="meta")  # type: ignore[attr-defined]
        weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    layer.weight = weight._quantize(device)  # also on meta, where `.to()` would skip quantising
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quant_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What dequantising needs besides the packed weights: 4-bit absmax (nested: quantised absmax, its
    offset, the second level's absmax and code) and code; int8's per-row scales."""
    tensors: list[torch.Tensor] = []
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
        tensors.append(getattr(param, "SCB", None))
    for module in model.modules():  # Linear8bitLt moves its weight's scales into its matmul state at the
        state = getattr(module, "state", None)  # first forward
        tensors.append(getattr(state, "SCB", None))
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _code_table_on_cpu() -> None:
    """bitsandbytes caches its blockwise code table on the device of the first tensor it quantises; a
    prediction on `meta` would leave a data-less table behind for the job's real quantisation. Creating it on
    the CPU first keeps the cache real (each quantisation copies it to its own device)."""
    from bitsandbytes import functional

    if "dynamic" not in functional.name2qmap:
        with torch.device("cpu"):  # mode=predict builds under torch.device("meta")
            functional.name2qmap["dynamic"] = functional.create_dynamic_map()


@contextlib.contextmanager
def int8_kernels_of(model: torch.nn.Module, quant: QuantConfig, device: str, modelled: list[str]) -> Iterator[None]:
    """The int8 matmul bitsandbytes picks on the target `device`, for a trace on meta tensors.

    bitsandbytes picks it by the input's device: in training on CPU it dequantises the weight and runs a
    16/32-bit matmul (`MatMul8bitFp`), elsewhere LLM.int8's int8 matmul (`MatMul8bitLt`). A trace on meta
    would always get the latter, so for a CPU target the choice is made as on the CPU. On CUDA the int8
    matmul sets aside the input's outlier columns (features above `threshold`, multiplied in 16-bit),
    which depend on the data a prediction has not got: the trace assumes none (random-init weights give
    (almost) none; a real checkpoint's outlier features add a 16-bit sub-matmul of a few columns)."""
    if quant.name != "int8":
        yield
        return
    import bitsandbytes
    from bitsandbytes.autograd import _functions

    if device == "cpu":
        def cpu_choice(A, B, out=None, state=None, threshold=0.0, bias=None):
            if state is not None and state.is_training:
                return _functions.MatMul8bitFp.apply(A, B, out, bias, state)
            return _functions.matmul(A, B, out, state, threshold, bias)

        with mock.patch.object(bitsandbytes, "matmul", cpu_choice):
            yield
        return
    states = [m.state for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear8bitLt)]
    thresholds = [state.threshold for state in states]
    if any(t > 0 for t in thresholds):
        modelled.append("int8: no outlier columns (the data decides them; predicted as none)")
    for state in states:
        state.threshold = 0.0
    try:
        yield
    finally:
        for state, threshold in zip(states, thresholds):
            state.threshold = threshold
