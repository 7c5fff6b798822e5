"""Benchmarks of ChunkedDecomp over grids of settings: :class:`ComprehensiveBenchmark` (memory, quality and
speed per cell, recommendations) and its plots. Imported lazily: ``import chunked_decomp.benchmarking`` loads
neither torch nor pandas."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ComprehensiveBenchmark": "benchmark",
    "recommend_from_results": "recommend",
    "SETTING_COLUMNS": "recommend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
