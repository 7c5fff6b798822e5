"""Every byte an object holds in tensors, found by walking it: the test of what a cache reports."""

from __future__ import annotations

import dataclasses
import enum
import types

import torch


def held_bytes(obj, exclude: tuple = ()) -> int:
    """Bytes of every tensor storage reachable from ``obj`` through attributes, dict values, list, tuple and set
    items and dataclass fields, each storage counted once and whole (a view holds its whole storage alive).
    Meta tensors hold nothing. ``exclude``: objects not to walk into (the model the cache was built for)."""
    seen_objects: set[int] = {id(x) for x in exclude}
    storages: dict[tuple, int] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen_objects or isinstance(x, (str, bytes, int, float, bool, complex, type(None))):
            continue
        seen_objects.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.device.type != "meta":
                s = x.untyped_storage()
                storages[(s.data_ptr(), str(x.device))] = s.nbytes()
            continue
        if isinstance(x, (type, types.FunctionType, types.MethodType, types.ModuleType, enum.Enum, torch.dtype,
                          torch.device, torch.nn.Module)):  # fmt: skip
            continue
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif dataclasses.is_dataclass(x):
            stack.extend(getattr(x, f.name) for f in dataclasses.fields(x))
            stack.extend(vars(x).values() if hasattr(x, "__dict__") else ())
        elif hasattr(x, "__dict__"):
            stack.extend(vars(x).values())
    return sum(storages.values())
