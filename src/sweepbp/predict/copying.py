"""`module_copy`: `copy.deepcopy` of a module tree, without its generic machinery where it is not needed.

A predict sweep traces a deep copy of a kept twin three times per prediction (predict/trace.py). `copy.deepcopy`
reduces every module and every one of its dozen hook `OrderedDict`s through `__reduce_ex__` and rebuilds it with
`copy._reconstruct`: 0.055 s of a Llama-3.1-8B prediction, against 0.023 s here (benchmarks/twin_copy.py,
docs/predict.md). A module's deep copy is its class's new instance given deep copies of its `__getstate__` (its
`__dict__` but the compiled call); plain dicts, `OrderedDict`s (without attributes of their own) and lists are
copied item by item, sets of atomic values (strings, numbers) as they are. That is what `copy.deepcopy` does for
them, with the same memo: anything else (tensors and parameters, a model's config, peft's variant objects, a
module class with a copy protocol of its own, a module with its own `__deepcopy__`) goes to `copy.deepcopy`
itself, so the copy is the deep copy.
"""

from __future__ import annotations

import copy
import copyreg
import functools
from collections import OrderedDict
from typing import Any

import torch

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type, torch.dtype)  # what deepcopy returns as it is
_MODULE_PROTOCOL = (torch.nn.Module.__getstate__, torch.nn.Module.__setstate__, object.__reduce_ex__,
                    object.__reduce__)


def module_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module`, equal to `copy.deepcopy(module)` (tests/test_depth.py compares them)."""
    return _copy(module, {})


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind in _ATOMIC:
        return value
    done = memo.get(id(value), memo)
    if done is not memo:
        return done
    if kind is dict or (kind is OrderedDict and not vars(value)):  # an OrderedDict's own attributes: deepcopy's
        new = kind()
        memo[id(value)] = new
        for key, item in value.items():
            new[_copy(key, memo)] = _copy(item, memo)
        return new
    if kind is list:
        new = []
        memo[id(value)] = new
        new.extend(_copy(item, memo) for item in value)
        return new
    if kind is set and all(type(item) in _ATOMIC for item in value):  # a module's non-persistent buffer names
        new = set(value)
        memo[id(value)] = new
        return new
    if isinstance(value, torch.nn.Module) and _plain_module(kind) and "__deepcopy__" not in value.__dict__:
        return _module(value, memo)
    return copy.deepcopy(value, memo)


@functools.cache
def _plain_module(kind: type) -> bool:
    """A module class whose deep copy is torch's own: `Module.__getstate__`, `Module.__setstate__`, no `__deepcopy__`,
    `__copy__`, `__reduce_ex__`, `__reduce__` or `__new__` of its own, no reducer registered with `copyreg`."""
    protocol = (kind.__getstate__, kind.__setstate__, kind.__reduce_ex__, kind.__reduce__)
    return (protocol == _MODULE_PROTOCOL and not hasattr(kind, "__deepcopy__") and not hasattr(kind, "__copy__")
            and kind.__new__ is object.__new__ and kind not in copyreg.dispatch_table)


def _module(module: torch.nn.Module, memo: dict[int, Any]) -> torch.nn.Module:
    """What `copy.deepcopy` does for a plain module: a new instance (memoised before its state is copied, as cycles
    need), the state deep-copied, then `__setstate__`."""
    new = object.__new__(type(module))
    memo[id(module)] = new
    state = module.__getstate__()
    memo.setdefault(id(memo), []).append(state)  # kept alive, as copy.deepcopy does: its id is not reused meanwhile
    new.__setstate__({_copy(key, memo): _copy(item, memo) for key, item in state.items()})
    return new
