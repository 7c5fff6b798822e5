"""Which measured compression setting to use: the cheapest one that meets a memory target within a quality limit,
judged by its worst measured cell (:func:`recommend_from_results`). Works on any results table with the columns
of :meth:`~chunked_decomp.benchmarking.benchmark.ComprehensiveBenchmark.run_scaling_analysis`; needs pandas, not
torch."""

from __future__ import annotations

import functools
import math
from typing import Any

__all__ = ["SETTING_COLUMNS", "recommend_from_results"]

#: Columns that identify a compression setting (those present in a results table are used).
SETTING_COLUMNS = ("method", "preset", "compression_ratio", "chunk_size")


def _is_baseline(frame: Any) -> Any:
    """Rows of the uncompressed baseline (method ``"full"``)."""
    if "method" in frame.columns:
        return frame["method"].astype(str).str.lower().isin(["full", "baseline", "uncompressed"])
    return frame["compression_ratio"] >= 1.0


def _check_request(
    results: Any, target_memory_reduction: float, max_quality_loss: float, columns: tuple
) -> None:
    """ValueError for a target that is not a number of percent in range, or a table without ``columns``."""
    for name, value in (
        ("target_memory_reduction", target_memory_reduction),
        ("max_quality_loss", max_quality_loss),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number (percent), got {value!r}")
    if not 0 <= target_memory_reduction < 100:
        raise ValueError(
            f"target_memory_reduction must be in [0, 100) percent, got {target_memory_reduction}"
        )
    for column in columns:
        if column not in results.columns:
            raise ValueError(f"results need a {column!r} column, got columns {list(results.columns)}")


def _worst_cases(frame: Any, keys: list[str], memory_column: str, quality_column: str) -> Any:
    """One row per setting: its smallest memory reduction, largest quality loss, cell count and (when measured)
    slowest speed ratio over the cells it was measured in."""
    aggregations = {memory_column: (memory_column, "min"), quality_column: (quality_column, "max")}
    aggregations["cells"] = (memory_column, "size")
    if "speed_ratio" in frame.columns:
        aggregations["speed_ratio"] = ("speed_ratio", "min")
    return frame.groupby(keys, dropna=False).agg(**aggregations).reset_index()


def _describe(row: dict[str, Any], keys: list[str], memory_column: str, quality_column: str) -> str:
    parts = [f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys]
    return f"{', '.join(parts)} ({row[memory_column]:.1f}% memory reduction, {row[quality_column]:+.2f}% perplexity)"


def _closest(
    grouped: Any, keys: list[str], memory_column: str, quality_column: str, target: float, limit: float
) -> list[str]:
    """What comes closest when no setting meets both targets: the most memory within the quality limit, the
    least quality loss at the memory target, else the least quality loss of all."""
    describe = functools.partial(
        _describe, keys=keys, memory_column=memory_column, quality_column=quality_column
    )
    by_memory = grouped[grouped[quality_column] <= limit]
    by_quality = grouped[grouped[memory_column] >= target]
    hints = []
    if not by_memory.empty:
        best = by_memory.sort_values(memory_column, ascending=False).iloc[0].to_dict()
        hints.append(f"within the quality limit the most memory is saved by {describe(best)}")
    if not by_quality.empty:
        best = by_quality.sort_values(quality_column).iloc[0].to_dict()
        hints.append(f"at that memory reduction the least quality is lost by {describe(best)}")
    if not hints:
        best = grouped.sort_values(quality_column).iloc[0].to_dict()
        hints.append(f"the least quality is lost by {describe(best)}")
    return hints


def _not_found(candidates: list[dict[str, Any]], message: str) -> dict[str, Any]:
    return {
        "found": False,
        "setting": None,
        "expected_memory_reduction": None,
        "expected_quality_loss": None,
        "candidates": candidates,
        "message": message,
    }


def recommend_from_results(
    results: Any,
    target_memory_reduction: float,
    max_quality_loss: float,
    memory_column: str = "memory_reduction_pct",
    quality_column: str = "perplexity_increase_pct",
) -> dict[str, Any]:
    """The best measured setting that saves at least ``target_memory_reduction`` percent of the KV cache with
    at most ``max_quality_loss`` percent perplexity increase.

    A setting (the :data:`SETTING_COLUMNS` present) measured in several cells (context lengths, batch sizes) is
    judged by its worst cell: the smallest memory reduction and the largest quality loss. Among the settings
    that meet both targets, the cheapest is the one that costs the least quality; ties go to the larger memory
    reduction, then the faster decoding. The uncompressed baseline is never recommended.

    Returns ``found``, ``setting`` (dict or ``None``), ``expected_memory_reduction`` and
    ``expected_quality_loss`` (percent, worst case over cells), ``expected_speed_ratio`` when measured,
    ``cells``, ``candidates`` (every setting with its worst case) and a plain-language ``message``; when nothing
    qualifies, ``message`` says so and names the settings that come closest.
    """
    _check_request(results, target_memory_reduction, max_quality_loss, (memory_column, quality_column))
    frame = results[~_is_baseline(results)].dropna(subset=[memory_column, quality_column])
    keys = [c for c in SETTING_COLUMNS if c in frame.columns]
    targets = (
        f"≥ {target_memory_reduction:g}% memory reduction with ≤ {max_quality_loss:g}% perplexity increase"
    )
    if frame.empty:
        return _not_found(
            [], f"No compressed setting was measured, so none can be recommended for {targets}."
        )
    grouped = _worst_cases(frame, keys, memory_column, quality_column)
    candidates = grouped.to_dict(orient="records")
    ok = grouped[
        (grouped[memory_column] >= target_memory_reduction) & (grouped[quality_column] <= max_quality_loss)
    ]
    if ok.empty:
        hints = _closest(
            grouped, keys, memory_column, quality_column, target_memory_reduction, max_quality_loss
        )
        return _not_found(candidates, f"No measured setting meets {targets}; " + "; ".join(hints) + ".")
    sort_cols, ascending = [quality_column, memory_column], [True, False]
    if "speed_ratio" in ok.columns:
        sort_cols.append("speed_ratio")
        ascending.append(False)
    best = ok.sort_values(sort_cols, ascending=ascending).iloc[0].to_dict()
    result = {
        "found": True,
        "setting": {k: best[k] for k in keys},
        "expected_memory_reduction": float(best[memory_column]),
        "expected_quality_loss": float(best[quality_column]),
        "cells": int(best["cells"]),
        "candidates": candidates,
        "message": f"Recommended for {targets}: {_describe(best, keys, memory_column, quality_column)}, "
        f"worst case over {int(best['cells'])} measured cell(s).",
    }
    if "speed_ratio" in best and best["speed_ratio"] == best["speed_ratio"]:
        result["expected_speed_ratio"] = float(best["speed_ratio"])
    return result
