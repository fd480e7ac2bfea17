"""Memory snapshots in PyTorch's own format, for any device: the step's memory in PyTorch's memory viewer.

A snapshot is what `torch.cuda.memory._snapshot()` returns: `segments` (the memory at the end, block by
block, each with the frames that allocated it) and `device_traces` (the alloc / free_requested /
free_completed events before that). The viewer (pytorch.org/memory_viz, or the page that
`torch.cuda._memory_viz.trace_plot` makes) replays the events over the segments. On CUDA the allocator
records it (measure/device.py). On CPU and in mode=predict, `SnapshotLog` builds one from the exact
tracker's own allocations and frees, so its replayed peak is the tracker's peak, byte for byte:

- One device (0) and one segment. Each storage gets its own address range, never reused (there is no
  caching allocator to model), so the segment spans every address the step used; its active blocks are
  the storages alive when the trace stopped. The views of allocator segments therefore mean nothing
  here; the Active Memory Timeline is the one to read (docs/snapshot.md).
- What existed before the step (weights, adapter, optimizer state, the batch) has no alloc event: the
  viewer takes a block or a free without one as allocated from the start, as in a CUDA snapshot.
- Each allocation's frames say, innermost first as in a stack: the operator, the module (e.g.
  `model.layers.7.mlp.down_proj.base_layer`), the tracker's category and the phase; for what existed
  before the step, its name (parameter, optimizer state, batch entry), category and `setup`.
- Events carry no `category` key: the viewer fails on a snapshot whose categories lack one named
  `unknown` (a typo in MemoryViz.js's `annotate_snapshot`); the category is a frame instead.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

BASE_ADDRESS = 0x7F0000000000  # where the made-up address space starts (looks like a device pointer)
ALIGNMENT = 512  # the CUDA caching allocator's smallest block: storages start at multiples of it
SNAPSHOT_FILE, PAGE_FILE = "memory_snapshot.pickle", "memory_snapshot.html"
PICKLE_PROTOCOL = 4  # the viewer's own unpickler reads protocols 2 to 4 (Python 3.14 pickles with 5 by default)
_FREES = ("free_requested", "free_completed")  # what a CUDA free records; the viewer joins the two


def frame(kind: str, name: str) -> dict:
    """One frame as the viewer shows it (`filename:line:name`): here `op:0:aten.mm.default` and the like."""
    return {"filename": kind, "line": 0, "name": name}


class SnapshotLog:
    """The tracker's allocations and frees of device memory during one step, as a snapshot.

    The tracker calls `alloc`, `free`, `retag` and `refused`; what it counts before `start` (the state it
    registers) is the snapshot's initial memory, and nothing is recorded after `stop`. `names` gives that
    state its names (storage key -> name); `where` says which module is running (train/scopes.py sets it).
    """

    def __init__(self, names: dict[int, str] | None = None):
        self.names = names or {}
        self.where: Callable[[], str] = lambda: "-"
        self._started = self._stopped = False
        self._next = BASE_ADDRESS
        self._live: dict[int, tuple[int, int, list[dict]]] = {}  # storage key -> (address, bytes, frames)
        self._events: list[dict] = []
        self._op_names: dict[object, str] = {}

    def start(self) -> None:
        self._started = True

    def stop(self) -> None:
        self._stopped = True

    def alloc(self, key: int, size: int, category: str, phase: str, op: object) -> None:
        if self._stopped or size == 0:  # an empty storage takes no memory (and would share an address)
            return
        address = self._next
        self._next += -(-size // ALIGNMENT) * ALIGNMENT
        if self._started:
            frames = [frame("op", self._op_name(op)), frame("module", self.where()), frame("category", category),
                      frame("phase", phase)]
            self._events.append({"action": "alloc", "addr": address, "size": size, "stream": 0, "frames": frames})
        else:
            frames = [frame("state", self.names.get(key, "-")), frame("category", category), frame("phase", phase)]
        self._live[key] = (address, size, frames)

    def free(self, key: int) -> None:
        entry = self._live.pop(key, None) if not self._stopped else None
        if entry is None or not self._started:
            return
        address, size, frames = entry
        self._events += [{"action": action, "addr": address, "size": size, "stream": 0, "frames": frames}
                         for action in _FREES]

    def retag(self, key: int, category: str) -> None:
        """A storage changed category (a gradient landed in `param.grad`): its frames say the new one."""
        entry = self._live.get(key) if not self._stopped else None
        if entry is not None:
            next(f for f in entry[2] if f["filename"] == "category")["name"] = category

    def refused(self, size: int, free: int) -> None:
        """The budget ran out at the allocation just recorded (the viewer shows an OOM event)."""
        if self._started and not self._stopped:
            self._events.append({"action": "oom", "size": size, "device_free": free, "stream": 0,
                                 "frames": self._events[-1]["frames"] if self._events else []})

    def snapshot(self) -> dict:
        """The snapshot as `torch.cuda.memory._snapshot()` shapes it."""
        blocks, cursor = [], BASE_ADDRESS
        for address, size, frames in sorted(self._live.values(), key=lambda entry: entry[0]):
            if address > cursor:
                blocks.append(_inactive(cursor, address - cursor))
            blocks.append({"address": address, "size": size, "requested_size": size, "state": "active_allocated",
                           "frames": frames})
            cursor = address + size
        if self._next > cursor:
            blocks.append(_inactive(cursor, self._next - cursor))
        live = sum(size for _, size, _ in self._live.values())
        segment = {"device": 0, "address": BASE_ADDRESS, "total_size": self._next - BASE_ADDRESS, "stream": 0,
                   "segment_type": "large", "segment_pool_id": (0, 0), "allocated_size": live,
                   "active_size": live, "requested_size": live, "is_expandable": False, "frames": [],
                   "blocks": blocks}
        return {"segments": [segment] if blocks else [], "device_traces": [list(self._events)]}

    def _op_name(self, op: object) -> str:
        name = self._op_names.get(op)
        if name is None:
            name = self._op_names[op] = str(op) if op is not None else "-"
        return name


def _inactive(address: int, size: int) -> dict:
    return {"address": address, "size": size, "requested_size": 0, "state": "inactive", "frames": []}


def write_snapshot(snapshot: dict, folder: Path) -> list[Path]:
    """memory_snapshot.pickle (open it at pytorch.org/memory_viz) and memory_snapshot.html (torch's own
    page around the same data: the Active Memory Timeline; it loads the viewer's script from the web)."""
    from torch.cuda import _memory_viz  # runs without CUDA; imported when a snapshot is written

    folder.mkdir(parents=True, exist_ok=True)
    data, page = folder / SNAPSHOT_FILE, folder / PAGE_FILE
    with data.open("wb") as out:
        pickle.dump(snapshot, out, protocol=PICKLE_PROTOCOL)
    # torch embeds the snapshot pickled with Python's default protocol; pinned to one the viewer reads
    readable = SimpleNamespace(dumps=lambda obj: pickle.dumps(obj, protocol=PICKLE_PROTOCOL))
    with mock.patch.object(_memory_viz, "pickle", readable):
        page.write_text(_memory_viz.trace_plot(snapshot))
    return [data, page]
