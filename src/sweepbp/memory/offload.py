"""Activation offloading: saved-tensor hooks that keep what autograd saves in host memory.

During the forward, every tensor autograd saves for the backward goes through `HostOffload._pack`:
weights and tiny tensors stay where they are; everything else is copied to host memory and the device
copy is dropped (once nothing else holds it). In the backward, `_unpack` copies it back to the device
right before the node that needs it. On CUDA the host buffers are pinned and both copies are
non-blocking on the current stream, so stream order keeps them correct.

CPU emulation: on a CPU-only machine host and device are the same RAM. The copies are still made,
and made inside `host_scope()`, so the memory tracker books the host side as `host_offload_bytes` and
the reloaded copies as device activations: the figures show what the strategy would keep where,
not a real saving of RAM (the time cost of the copies is also CPU memcpy, not PCIe).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sweepbp.measure.tracker import host_scope, layer_scope, storage_key


@dataclass
class OffloadStats:
    """What the last forward moved to the host: distinct storages and their bytes (tests read it)."""

    storages: int = 0
    bytes: int = 0


@dataclass
class _Stashed:
    """A saved tensor whose storage lives in host memory until the backward needs it on `device`."""

    host: torch.Tensor  # the whole storage, as bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    device: torch.device

    def view_of(self, storage_bytes: torch.Tensor) -> torch.Tensor:
        """The saved tensor, as a view of a copy of its storage (view ops, not `set_`: see `_storage_bytes`)."""
        return storage_bytes.view(self.dtype).as_strided(self.shape, self.stride, self.offset)


class HostOffload:
    """Saved-tensor hooks moving activations of one model to host memory.

    `min_bytes`: saved tensors smaller than this stay on the device (a copy costs more than it saves).
    The unit moved is a storage, copied once however many saved tensors view it (one LoRA input feeds
    q, k and v; attention's output is saved again reshaped as o_proj's input): host memory then holds
    exactly what the device would have kept alive without offloading.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, min_bytes: int):
        self.model = model
        self.device = device
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        self._weights: set[int] = set()
        self._copies: dict[tuple[int, int], torch.Tensor] = {}  # (device storage, version) -> host copy

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """One forward pass: learn which storages are weights now (a precision plugin may have cast
        them since the strategy was applied), and forget the host copies' index when it ends."""
        self._weights = {storage_key(t) for t in [*self.model.parameters(), *self.model.buffers()]}
        self.stats = OffloadStats()
        try:
            yield
        finally:
            self._copies.clear()  # the autograd graph holds the copies from here on

    @contextlib.contextmanager
    def offloading(self) -> Iterator[None]:
        """A forward pass whose saved activations all go to the host."""
        with self.session(), self.hooks():
            yield

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The hooks alone, for a region inside a session (ckpt_offload: one checkpoint call)."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Stashed:
        if self._stays(tensor):
            return tensor
        storage = tensor.untyped_storage()
        key = (storage._cdata, tensor._version)  # views of one storage share its version counter
        host = self._copies.get(key)
        if host is None:
            host = self._copy_to_host(tensor)
            self._copies[key] = host
            # The storage's address may be reused once it is freed: drop its entries with it.
            weakref.finalize(storage, self._forget, key[0])
            self.stats.storages += 1
            self.stats.bytes += host.numel()
        return _Stashed(host, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset(),
                        tensor.device)

    def _stays(self, tensor: torch.Tensor) -> bool:
        return (tensor.device != self.device or tensor.layout != torch.strided
                or tensor.numel() * tensor.element_size() < self.min_bytes
                or storage_key(tensor) in self._weights)

    def _copy_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor's whole storage, as bytes in (pinned, on CUDA) host memory."""
        cuda = tensor.device.type == "cuda"
        with torch.no_grad():
            source = _storage_bytes(tensor)
            with host_scope():
                host = torch.empty(source.numel(), dtype=torch.uint8, device="cpu", pin_memory=cuda)
                host.copy_(source, non_blocking=cuda)
        return host

    def _unpack(self, packed: torch.Tensor | _Stashed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        # Reloaded activations are device memory of the backward: count them as activations. The whole
        # storage comes back in one contiguous (non-blocking, from pinned memory) copy, then is viewed.
        with torch.no_grad(), layer_scope():
            if packed.device.type in ("cpu", "meta"):  # CPU emulation, mode=predict's meta trace: a fresh
                # "device" copy, as a transfer would make
                storage_bytes = packed.host.clone()
            else:
                storage_bytes = packed.host.to(packed.device, non_blocking=True)
            return packed.view_of(storage_bytes)

    def _forget(self, freed: int) -> None:
        for key in [k for k in self._copies if k[0] == freed]:
            del self._copies[key]


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's whole storage as a flat uint8 view. Built from view ops: `empty(0).set_(storage)` would
    do the same, but under FakeTensorMode (mode=predict with autocast) it keeps the storage alive for good,
    so the prediction would never see the device copy freed."""
    whole = tensor.untyped_storage().nbytes() // tensor.element_size()
    return tensor.as_strided((whole,), (1,), 0).view(torch.uint8)
