"""The target device of a prediction: the kernels it would choose, decided explicitly for the data-less trace.

mode=predict traces on `meta` tensors (fake CPU tensors under autocast). Most of a LoRA step allocates
the same tensors whatever the device; where the device decides, this module decides as the target would:

- Attention (`F.scaled_dot_product_attention`): `target_kernels` replaces it, for the trace, by `sdpa`,
  which calls the backend op the target's dispatcher would pick (as PyTorch's composite calls it), so
  autograd saves what that kernel saves. CPU (sdp_utils_cpp.cpp): flash unless dropout > 0 or shapes forbid
  it (K/V heads that only broadcast over the query's without `enable_gqa`, a mask of another shape or one that
  needs a gradient, among them), else math. CUDA on sm80+ (A100, H100, H200, L4, RTX 4090; sdp_utils.cpp):
  flash for 16-bit inputs without
  a mask: the output and an fp32 logsumexp (B, H, L) are saved; memory-efficient for fp32 or masked
  inputs without grouped KV heads (logsumexp padded to a multiple of 32 in L; a padded batch's mask, made
  additive, is saved too, copied with its last dimension padded to a multiple of 8 when its strides are
  not; transformers repeats K/V for grouped heads whenever it passes a mask); math otherwise, which
  keeps the (B, H, L, L) attention matrix (and, with grouped KV heads, K and V expanded to all heads). cuDNN attention, preferred by some builds on sm90, saves the same output and
  logsumexp as flash. Without this, meta tensors would always take the math path. The replacement is
  a patch of the module attribute, not a TorchFunctionMode: function modes are not active in the
  backward, where checkpointing recomputes attention.
- AdamW: foreach on CUDA (temporaries for all adapter tensors at once), a per-tensor loop on CPU
  (`predict.trace._foreach`).
- AdamW's step counters (real CPU scalars beside the meta model): device memory for a CPU target, host
  memory for a CUDA one (`predict.trace.no_data`).
- `*-mixed` precision for a CUDA target is traced with CPU autocast, whose cast lists differ slightly.

Not modelled (docs/predict.md): memory a kernel allocates for itself (flash/cuDNN backward scratch,
cuBLAS workspace), the CUDA caching allocator's rounding and fragmentation, the CUDA context.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sweepbp.measure.tracker import MemoryTracker, storage_key, tensors_of

HALF = (torch.float16, torch.bfloat16)


def heads_match(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool,
                supports_gqa: bool) -> bool:
    """PyTorch's check_batch_size_and_num_heads_dense (sdp_utils_cpp.h): one batch size; the same number of heads
    in query, key and value, or, where the kernel supports grouped-query attention and the caller asks for it
    (`enable_gqa`), key and value with as many heads as each other, dividing the query's. Key/value heads that
    only broadcast (Falcon's multi-query attention calls SDPA with one K/V head and no `enable_gqa`) leave a
    fused kernel out: the dispatcher takes math."""
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        return False
    q_heads, k_heads, v_heads = query.shape[-3], key.shape[-3], value.shape[-3]
    if enable_gqa and supports_gqa:
        return k_heads == v_heads and q_heads % k_heads == 0
    return q_heads == k_heads == v_heads


def cpu_sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                     dropout_p: float, is_causal: bool, enable_gqa: bool = False) -> str:
    """The SDPA backend PyTorch's CPU dispatcher picks (use_flash_attention_cpp): flash, else math."""
    dense = query.dim() == key.dim() == value.dim() == 4
    same_dim = query.shape[-1] == key.shape[-1] == value.shape[-1]
    unit_stride = all(t.stride(-1) == 1 for t in (query, key, value))
    dtypes = (torch.float32, torch.float64, *HALF)
    if (dropout_p == 0.0 and dense and same_dim and unit_stride and query.dtype in dtypes
            and heads_match(query, key, value, enable_gqa, supports_gqa=True) and mask_fits(query, key, attn_mask)):
        return "flash"
    return "math"


def mask_fits(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """PyTorch's check_attn_mask_shape (CPU flash): no mask, or one that needs no gradient, 2-D or 4-D, whose last
    two dimensions are the query's and the key's lengths (or 1) and whose batch and head dimensions are 1 or
    the query's."""
    if attn_mask is None:
        return True
    if attn_mask.requires_grad or attn_mask.dim() not in (2, 4):
        return False
    if attn_mask.shape[-2] not in (query.shape[-2], 1) or attn_mask.shape[-1] not in (key.shape[-2], 1):
        return False
    return attn_mask.dim() == 2 or (attn_mask.shape[0] in (1, query.shape[0])
                                    and attn_mask.shape[1] in (1, query.shape[1]))


def cuda_sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                      dropout_p: float, is_causal: bool, enable_gqa: bool = False) -> str:
    """The SDPA backend PyTorch's CUDA dispatcher picks on sm80+ (flash > efficient > math)."""
    d_q, d_k, d_v = query.shape[-1], key.shape[-1], value.shape[-1]
    square = query.shape[-2] == key.shape[-2]
    if (attn_mask is None and query.dtype in HALF and d_q == d_k == d_v <= 256 and (square or not is_causal)
            and heads_match(query, key, value, enable_gqa, supports_gqa=True)):
        return "flash"
    alignment = 8 if query.dtype in HALF else 4  # minimum GEMM alignment on sm80+
    same_heads = heads_match(query, key, value, enable_gqa, supports_gqa=False)  # its backward has no GQA (2.13)
    if (d_q == d_k and d_q % alignment == 0 and d_v % alignment == 0 and same_heads
            and query.dtype in (*HALF, torch.float32)):
        return "efficient"
    return "math"


def sdpa(device: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False) -> tuple[torch.Tensor, str]:
    """`F.scaled_dot_product_attention` as `device` runs it: the chosen backend's own op, called as PyTorch's
    composite calls it (bool masks made additive first). Returns the output and the backend's name."""
    choose = cuda_sdpa_backend if device == "cuda" else cpu_sdpa_backend
    backend = choose(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # as convert_boolean_attn_mask (attention.cpp)
        attn_mask = torch.where(attn_mask, 0.0, torch.scalar_tensor(float("-inf"), dtype=query.dtype,
                                                                    device=attn_mask.device))
    aten = torch.ops.aten
    if backend == "flash" and device == "cpu":
        out = aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                               attn_mask=attn_mask, scale=scale)[0]
    elif backend == "flash":
        pad = (-query.shape[-1]) % 8  # CUDA's composite pads the head dim to a multiple of 8 for flash
        padded = [torch.nn.functional.pad(t, (0, pad)) if pad else t for t in (query, key, value)]
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        out = aten._scaled_dot_product_flash_attention(*padded, dropout_p, is_causal, False, scale=scale)[0]
        out = out[..., :query.shape[-1]] if pad else out
    elif backend == "efficient":
        grad = query.requires_grad or key.requires_grad or value.requires_grad
        if attn_mask is not None:
            attn_mask = _aligned_bias(attn_mask).expand(*query.shape[:-1], key.shape[-2])
        out = aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, dropout_p, is_causal,
                                                           scale=scale)[0]
    else:
        out = aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                      scale=scale, enable_gqa=enable_gqa)[0]
    return out, backend


def _aligned_bias(bias: torch.Tensor, alignment: int = 8) -> torch.Tensor:
    """A mask as CUDA's composite prepares it for the memory-efficient kernel (attention.cpp, preprocess_mask):
    one whose strides are not multiples of 8 elements is copied with its last dimension padded to the next
    multiple of 8 (then sliced back). The kernel saves it for its backward. Modelled from the source, not
    measured on a GPU (a padded batch's mask is the only one sweepbp's models pass)."""
    if all(stride % alignment == 0 for stride in bias.stride()[:-1]) and bias.stride(-1) == 1:
        return bias
    last = bias.shape[-1]
    return torch.nn.functional.pad(bias, (0, alignment - last % alignment))[..., :last]


class MetaTracker(MemoryTracker):
    """The exact tracker for a meta trace, faster: ops repeat with the same shapes in every layer, every trace
    and every prediction of a process, and many meta kernels are Python (up to about a millisecond per call:
    pointwise ops, reductions, `cat`; docs/performance.md). The output layout of a functional op that returns one
    fresh tensor is a function of its inputs' layouts and arguments, so it is remembered (`_LAYOUTS`, for the
    process) and remade with `empty_strided`: the same storage the kernel would make. An in-place pointwise op
    returns its input, as the kernel does, and an in-place `_foreach_` op on meta tensors (AdamW's update on CUDA)
    returns nothing and allocates nothing: its meta kernel only checks each tensor's shape, a Python call per
    adapter tensor. One dispatch mode, since each costs time per op. Inside `host_scope` (an offload's host
    copies) buffers asked for on a real device stay on meta, booked as host memory.
    """

    cpu_kernels = False  # CpuMetaTracker: the target's kernels are CPU ones where their outputs differ from meta's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = func
        if func in _INDEXING:  # an index given as a Python list reaches a meta op uncounted (see `_INDEXING`)
            for index in tensors_of(args[1]):  # the indices (not index_put's values)
                if index.is_meta:  # only on meta is an index made without a dispatch
                    self._add(index, self._category_for_new())  # a storage counted already is skipped
        wanted = kwargs.get("device") if kwargs and self._host_depth else None
        if wanted is not None and torch.device(wanted).type != "meta":
            # an offload's host buffer (inside host_scope): kept on meta, booked as host memory
            kwargs = {**kwargs, "device": torch.device("meta"), "pin_memory": False}
            return super().__torch_dispatch__(func, types, args, kwargs)
        if _updates_meta_in_place(func, args):
            return _updated(func, args)
        if func is _LAYER_NORM and self.cpu_kernels and args[0].is_meta:
            return self._layer_norm_as_on_cpu(func, args, kwargs)
        kind = _fresh_outputs(func)
        key = _layout_key(func, args, kwargs) if kind is not None else None
        layouts = _LAYOUTS.get(key, _UNKNOWN) if key is not None else None
        if layouts is None:  # not an op whose outputs are remembered
            return super().__torch_dispatch__(func, types, args, kwargs)
        if layouts is _UNKNOWN:
            out = func(*args, **(kwargs or {}))
            outs = _outputs(out, kind)
            _LAYOUTS[key] = _remade_layouts(outs, (args, kwargs), counted=self._sizes)
        else:
            outs = [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in layouts]
            out = outs[0] if kind == _ONE else tuple(outs) if kind == _TUPLE else outs
        self._count(outs)
        return out

    def _count(self, outs) -> None:
        """Count an op's new outputs in their order, as the tracker counts any op's (not an undefined output, None)."""
        category = self._category_for_new()
        for tensor in outs:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, category)

    def _layer_norm_as_on_cpu(self, func, args, kwargs):
        """`native_layer_norm` as the CPU kernel makes it: its saved mean and rstd in the input's dtype unless the
        weight or bias has another (then fp32; ATen's cpu/mixed_data_type.h), where the meta kernel makes them fp32
        always, as CUDA does. A bf16-true LayerNorm model (GPT-2, OPT, Phi, ...) kept 2 bytes per row and norm too
        many otherwise."""
        out, mean, rstd = func(*args, **(kwargs or {}))
        given = args[0]  # native_layer_norm(input, normalized_shape, weight, bias, eps)
        params = [args[i] if len(args) > i else (kwargs or {}).get(name) for i, name in ((2, "weight"), (3, "bias"))]
        mixed = any(p is not None and p.dtype != given.dtype for p in params)
        dtype = torch.float32 if mixed else given.dtype
        mean, rstd = (torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="meta") for t in (mean, rstd))
        self._count((out, mean, rstd))
        return out, mean, rstd


_LAYER_NORM = torch.ops.aten.native_layer_norm.default  # remade for a CPU target (CpuMetaTracker)


class CpuMetaTracker(MetaTracker):
    """`MetaTracker` for a CPU target: LayerNorm, whose CPU kernel makes other outputs than the meta kernel (which
    follows CUDA's), is remade as the CPU makes it (`_layer_norm_as_on_cpu`). Batch norm differs the same way and is
    not remade: the language models sweepbp builds have none."""

    cpu_kernels = True


class MetaUpdates(TorchDispatchMode):
    """Outside a tracker (AdamW's warm-up step): in-place pointwise and `_foreach_` ops on meta tensors skipped as
    `MetaTracker` skips them, everything else run as it is."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _updates_meta_in_place(func, args):
            return _updated(func, args)
        return func(*args, **(kwargs or {}))


def _updates_meta_in_place(func, args) -> bool:
    """An in-place pointwise op on a meta tensor, or an in-place `_foreach_` op on meta tensors: no allocation, no
    value, only the meta kernel's shape checks (Python calls, one per tensor of a `_foreach_` list)."""
    kind = _in_place_kind(func)
    if kind is None or not args:
        return False
    if kind == _POINTWISE:
        return isinstance(args[0], torch.Tensor) and args[0].is_meta
    return all(t.is_meta for t in tensors_of(args))


_POINTWISE, _FOREACH = "pointwise", "foreach"


@functools.cache
def _in_place_kind(func) -> str | None:
    """What of `_updates_meta_in_place` depends on the op alone, once per op (its schema's fields are C++ calls):
    an in-place pointwise op, an in-place `_foreach_` op that returns nothing, or neither (None)."""
    schema = func._schema
    if not (schema.name.endswith("_") and schema.is_mutable):
        return None
    if torch.Tag.pointwise in func.tags:
        return _POINTWISE
    return _FOREACH if schema.name.startswith("aten::_foreach_") and not schema.returns else None


def _updated(func, args):
    """What a skipped in-place update returns: its own, already counted, input (a `_foreach_` op: nothing)."""
    return args[0] if func._schema.returns else None


# Ops that take index tensors. `x[..., [-2], :]` (Falcon's multi-query split of the fused QKV) turns the list into
# an index tensor on x's device: on a real device through `lift_fresh`, which the tracker counts, and on meta
# without any dispatch. Indexing saves it for the backward, so it lives until then: counted when an op gets it.
_INDEXING = frozenset({torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                       torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default})
_LAYOUTS: dict[tuple, tuple | None] = {}  # op and its inputs' layouts -> (shape, stride, dtype) of each output, or None
_UNKNOWN = object()  # an op not yet seen with these inputs (not a result: an op of no outputs remembers ())
_SCALARS = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _layout_key(func, args, kwargs) -> tuple | None:
    """A cache key for a functional op returning fresh tensors only (`_fresh_outputs`), on meta tensors and plain
    arguments; else None."""
    key: list = [func, torch.get_default_dtype()]  # the default dtype decides some promotions (int / int)
    if not _append_layouts(key, args) or (kwargs and not _append_layouts(key, (tuple(kwargs), *kwargs.values()))):
        return None
    return tuple(key)


_ONE, _TUPLE, _LIST = "one", "tuple", "list"  # what a remembered op returns: a tensor, a tuple of them, a list


@functools.cache
def _fresh_outputs(func) -> str | None:
    """How a functional op returns tensors that alias no input, by its schema: one tensor (`mm`), a tuple of them
    (`nll_loss_forward`'s loss and total weight), or one list of them (`_foreach_sqrt`, AdamW's on CUDA); None for
    any other op (views, in-place ops, a non-tensor output such as flash attention's sizes). Once per op: its
    schema's fields are C++ calls."""
    schema = func._schema
    returns = schema.returns
    if schema.is_mutable or not returns or any(r.alias_info is not None for r in returns):
        return None
    types = [str(r.type) for r in returns]
    if types == ["Tensor"]:
        return _ONE
    if types == ["List[Tensor]"]:
        return _LIST
    return _TUPLE if all(t == "Tensor" for t in types) else None


def _outputs(out, kind: str) -> list:
    """An op's output tensors as a list, in order (an op of `kind` may still return something else: undefined
    outputs come back as None, which `_remade_layouts` refuses)."""
    if kind == _ONE:
        return [out]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _append_layouts(key: list, values) -> bool:
    """Add each value's layout (tensors) or value (scalars, lists of them) to `key`; False for anything else."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if not value.is_meta:
                return False
            key.append((value.shape, value.stride(), value.storage_offset(), value.dtype))
        elif isinstance(value, (list, tuple)):
            key.append(len(value))
            if not _append_layouts(key, value):
                return False
        elif isinstance(value, _SCALARS):
            key.append((type(value), value))
        else:
            return False
    return True


def _remade_layouts(outs: list, inputs, counted) -> tuple | None:
    """What `empty_strided` needs to remake each of the outputs `outs` with the same storage, or None if it cannot
    (an output that is not a tensor, on another device, one that does not fill its own storage from its start, or
    one whose storage exists already: `counted` by the tracker, another output's, or an input's although the schema
    does not say so, as `_unsafe_view`'s is)."""
    taken = {storage_key(t) for t in tensors_of(inputs)}
    layouts = []
    for out in outs:
        if not isinstance(out, torch.Tensor) or not out.is_meta or out.storage_offset() != 0:
            return None
        key = storage_key(out)
        if key in counted or key in taken:
            return None
        taken.add(key)
        remade = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device="meta")
        if remade.untyped_storage().nbytes() != out.untyped_storage().nbytes():
            return None
        layouts.append((out.shape, out.stride(), out.dtype))
    return tuple(layouts)


@contextlib.contextmanager
def target_kernels(device: str, modelled: list[str]) -> Iterator[None]:
    """While tracing: attention as the target runs it."""
    def attention(*args, **kwargs):
        args, kwargs = _autocast(args, kwargs)
        with torch.autocast("cpu", enabled=False):  # as autocast's wrapper runs the op: its inner ops uncast
            out, backend = sdpa(device, *args, **kwargs)
        modelled.append(f"attention: the {device} dispatcher's {backend} SDPA kernel")
        return out

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", attention):
        yield


def _autocast(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Autocast's cast of SDPA's inputs (SDPA is on its lower-precision list for CPU and CUDA): the backend
    ops called instead are on no list, so the cast is applied here, as autocast would. Autocast then runs the op
    with itself switched off: the math backend's own ops (it computes 16-bit inputs in fp32, then matmuls) must
    not be cast again (they were: 98,304 bytes too few at a 3-layer Falcon's peak, whose multi-query heads take
    math)."""
    if not torch.is_autocast_enabled("cpu"):  # the trace's device type when autocast is on (fake CPU)
        return args, kwargs
    dtype = torch.get_autocast_dtype("cpu")

    def cast(value):
        eligible = isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
        return value.to(dtype) if eligible else value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


@dataclass(frozen=True)
class StepPrecision:
    """What the precision plugin of a real job's Lightning Trainer does for `trainer.precision` (as its accelerator
    connector picks it), without importing Lightning: `convert_module` is what a fit applies to the module, and
    `train_step_context` what surrounds every training step. tests/test_predict.py checks both against Lightning's
    own plugins for every precision."""

    weights: torch.dtype | None = None  # the module's floating point dtype after conversion (None: unchanged)
    default_dtype: torch.dtype | None = None  # torch's default dtype inside a step (true half, double precision)
    autocast: torch.dtype | None = None  # CPU autocast's dtype inside a step (mixed precision)

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module if self.weights is None else module.to(dtype=self.weights)

    @contextlib.contextmanager
    def train_step_context(self) -> Iterator[None]:
        if self.autocast is not None:
            with torch.autocast("cpu", dtype=self.autocast, cache_enabled=False):
                yield
            return
        default = torch.get_default_dtype()
        if self.default_dtype is not None:
            torch.set_default_dtype(self.default_dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(default)


def precision_plugin(precision: str, device: str, modelled: list[str]) -> StepPrecision:
    """The precision of a real job's Trainer, as the trace applies it (see StepPrecision)."""
    if precision in ("16-true", "bf16-true"):
        half = torch.bfloat16 if precision == "bf16-true" else torch.float16
        return StepPrecision(weights=half, default_dtype=half)
    if precision in ("32-true", "32"):
        return StepPrecision()
    if precision == "64-true":
        return StepPrecision(weights=torch.float64, default_dtype=torch.float64)
    if device == "cuda":
        modelled.append(f"precision: {precision} traced with CPU autocast (CUDA's cast lists differ slightly)")
    # Lightning turns 16-mixed on CPU into bf16-mixed (16-mixed's GradScaler on CUDA keeps a few scalars, not traced)
    return StepPrecision(autocast=torch.bfloat16 if precision == "bf16-mixed" or device == "cpu" else torch.float16)
