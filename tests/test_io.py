"""Atomic writes and the resumable result store."""

from __future__ import annotations

import json
import os

import pytest

from chunked_decomp.io import (
    ResultStore,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cell_key,
    check_output_dir,
    write_table,
)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert _leftovers(tmp_path) == []


def test_crash_in_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"rows": [1, 2, 3]})

    def crash(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_json(path, {"rows": list(range(10_000))})
    assert json.loads(path.read_text()) == {"rows": [1, 2, 3]}
    assert _leftovers(tmp_path) == []


def test_crash_while_writing_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    atomic_write_bytes(path, b"\x89PNG old")

    class Boom(Exception):
        pass

    real_fsync = os.fsync

    def fail_fsync(fd):
        real_fsync(fd)
        raise Boom("disk vanished mid-write")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(Boom):
        atomic_write_bytes(path, b"\x89PNG new, longer content")
    assert path.read_bytes() == b"\x89PNG old"
    assert _leftovers(tmp_path) == []


def test_json_is_strict_and_converts_numbers(tmp_path):
    import numpy as np
    import torch

    path = atomic_write_json(
        tmp_path / "x.json",
        {
            "nan": float("nan"),
            "inf": float("inf"),
            "np": np.float32(1.5),
            "t": torch.tensor([1, 2]),
            "p": tmp_path,
        },
    )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nan": None, "inf": None, "np": 1.5, "t": [1, 2], "p": str(tmp_path)}


def test_write_table_csv_and_json(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"ratio": [0.5, 0.25], "ppl": [10.0, float("nan")]})
    csv_path, json_path = write_table(frame, tmp_path / "table")
    assert pd.read_csv(csv_path)["ratio"].tolist() == [0.5, 0.25]
    assert json.loads(json_path.read_text()) == [{"ratio": 0.5, "ppl": 10.0}, {"ratio": 0.25, "ppl": None}]


def test_cell_key_ignores_order():
    assert cell_key({"a": 1, "b": [1, 2]}) == cell_key({"b": [1, 2], "a": 1})
    assert cell_key({"a": 1}) != cell_key({"a": 2})


def test_store_skips_finished_cells(tmp_path):
    calls = []

    def compute(x):
        calls.append(x)
        return {"value": x * 10}

    store = ResultStore(tmp_path / "cells")
    for _ in range(2):
        for x in (1, 2, 3):
            result, _ = store.get_or_compute({"x": x}, lambda x=x: compute(x))
            assert result == {"value": x * 10}
    assert calls == [1, 2, 3]
    assert len(store) == 3


def test_store_recomputes_corrupt_or_foreign_entries(tmp_path):
    store = ResultStore(tmp_path)
    store.put({"x": 1}, {"value": 1})
    store.put({"x": 2}, {"value": 2})
    store.put({"x": 3}, {"value": 3})
    store.path({"x": 1}).write_text('{"params": {"x": 1}, "result": {"val')  # truncated by a crash
    store.path({"x": 2}).write_text(json.dumps({"params": {"x": 99}, "result": {"value": 2}}))  # other params
    store.path({"x": 3}).write_text(json.dumps({"params": {"x": 3}, "result": [3]}))  # malformed
    assert store.get({"x": 1}) is None and store.get({"x": 2}) is None and store.get({"x": 3}) is None
    result, cached = store.get_or_compute({"x": 1}, lambda: {"value": "recomputed"})
    assert (result, cached) == ({"value": "recomputed"}, False)
    assert store.get({"x": 1}) == {"value": "recomputed"}


def test_store_failed_compute_leaves_nothing(tmp_path):
    store = ResultStore(tmp_path)

    def fail():
        raise RuntimeError("cell crashed")

    with pytest.raises(RuntimeError):
        store.get_or_compute({"x": 1}, fail)
    assert store.get({"x": 1}) is None and len(store) == 0


def test_check_output_dir(tmp_path):
    made = check_output_dir(tmp_path / "new" / "nested")
    assert made.is_dir() and list(made.iterdir()) == []
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--output_dir must be a directory"):
        check_output_dir(a_file)
    with pytest.raises(ValueError, match="--output_dir .* is not writable"):
        check_output_dir(a_file / "sub")
