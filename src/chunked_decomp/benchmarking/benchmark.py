"""`ComprehensiveBenchmark`: memory, quality and speed of ChunkedDecomp over a grid of settings.

Each cell of the grid (compression ratio × context length × batch size, plus the uncompressed baseline for each
context length and batch size) runs the "context + continuation" protocol on ``batch`` windows of real text:

* **memory** — the exact bytes the cache holds for the context (``stored_bytes``; a full cache counted at 16
  bits, as deployed) against an uncompressed 16-bit cache of the same tokens (ρ, ``memory_reduction_pct`` =
  ``100 (1 − ρ)``), and the peak process memory during the cell (RSS on CPU — which includes the weights and
  rarely falls back after a larger earlier cell —, CUDA's allocator peak on a GPU);
* **quality** — perplexity of the continuation, teacher-forced while attending to the compressed context, and its
  increase over the uncompressed baseline of the same context length and batch;
* **speed** — greedy decoding tokens/s (median step) on top of the compressed context, and its ratio to the
  uncompressed cache timed *in the same cell*, right before, so that both see the same machine load.

Finished cells are kept in a :class:`~chunked_decomp.io.ResultStore` under ``output_dir/cells/scaling``; a rerun
skips them. The table is written as ``scaling_results.csv`` and ``.json`` after every cell (atomically).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chunked_decomp.benchmarking.recommend import SETTING_COLUMNS, recommend_from_results
from chunked_decomp.io import ResultStore, check_output_dir, write_table

# The recommendation lives in recommend.py (no torch needed); it stays part of this module's interface.
__all__ = ["ComprehensiveBenchmark", "SETTING_COLUMNS", "recommend_from_results"]

_MB = 1024 * 1024


def token_fingerprint(token_ids: torch.Tensor) -> str:
    """Short hash of a token stream, so stored cells are reused only for the same text."""
    data = token_ids.to(torch.int64).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _check_grid(
    compression_ratios: Sequence[float], sequence_lengths: Sequence[int], batch_sizes: Sequence[int]
) -> list[float]:
    """The ratios as floats; ValueError for a ratio outside (0, 1] or a length or batch size that is not a
    positive integer."""
    ratios = [float(r) for r in compression_ratios]
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"compression ratios must be in (0, 1], got {r}")
    for name, values in (("sequence_lengths", sequence_lengths), ("batch_sizes", batch_sizes)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be positive integers, got {list(values)}")
    return ratios


class ComprehensiveBenchmark:
    """Scaling analysis of ChunkedDecomp and recommendations from it.

    Args:
        output_dir: where ``scaling_results.csv/.json``, the plot and the finished cells go (``None``: keep
            results in memory only, no resume).
        model, tokenizer: an already loaded model (``model_name`` then only labels the results); otherwise
            :meth:`run_scaling_analysis` loads ``model_name`` with :func:`chunked_decomp.hf.loading.load_model_and_tokenizer`.
        token_ids: ``(n,)`` evaluation token stream; otherwise the text of ``dataset_name`` / ``text_file``.
        preset: compression preset the ratios are applied to (``None`` = `CompressionConfig` defaults);
            ``config_overrides`` change further fields. Budgets always count against a 16-bit cache.
        continuation_length: tokens scored after each context. decode_tokens: decoding steps timed.
        start: first token of the first window in the stream.
        progress: show a tqdm progress bar.

    Example::

        bench = ComprehensiveBenchmark("results/")
        df = bench.run_scaling_analysis("smollm2-135m", [0.5, 0.25], [512, 1024], [1, 4])
        bench.recommend_optimal_settings(target_memory_reduction=70, max_quality_loss=5)
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        token_ids: torch.Tensor | None = None,
        dataset_name: str = "wikipedia",
        text_file: str | Path | None = None,
        num_samples: int | None = None,
        preset: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        continuation_length: int = 128,
        decode_tokens: int = 16,
        start: int = 0,
        dtype: str = "float32",
        device: str = "cpu",
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ):
        self.output_dir = check_output_dir(output_dir) if output_dir is not None else None
        self.model = model
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.dataset_name = dataset_name
        self.text_file = text_file
        self.num_samples = num_samples
        self.preset = preset
        self.config_overrides = dict(config_overrides or {})
        self.continuation_length = continuation_length
        self.decode_tokens = decode_tokens
        self.start = start
        self.dtype = dtype
        self.device = device
        self.cache_dir = cache_dir
        self.progress = progress
        self.results = None
        self.cells_computed = 0
        self.cells_reused = 0
        if preset is not None:
            from chunked_decomp.config import CompressionConfig

            CompressionConfig.from_preset(preset, **self.config_overrides)  # fail early on a bad preset

    # ---- inputs -------------------------------------------------------------------------------------------
    def _load(self, model_name: str) -> None:
        if self.model is None:
            from chunked_decomp.hf.loading import load_model_and_tokenizer

            self.model, self.tokenizer = load_model_and_tokenizer(
                model_name, dtype=self.dtype, device=self.device, cache_dir=self.cache_dir
            )
        if self.token_ids is None:
            if self.tokenizer is None:
                raise ValueError(
                    "pass token_ids=, or a tokenizer with the model, to tokenize the evaluation text"
                )
            from chunked_decomp.evaluation.data import load_texts, load_token_ids

            texts = load_texts(self.dataset_name, text_file=self.text_file, num_samples=self.num_samples)
            self.token_ids = load_token_ids(self.tokenizer, texts)
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.long).flatten()

    def windows(self, seq_len: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context (batch, seq_len), continuation (batch, continuation_length))`` from consecutive,
        non-overlapping spans of the token stream starting at ``start``."""
        span = seq_len + self.continuation_length
        need = self.start + span * batch
        if self.token_ids.numel() < need:
            raise ValueError(
                f"the evaluation text has {self.token_ids.numel()} tokens; batch {batch} of {seq_len} context + "
                f"{self.continuation_length} continuation tokens from start={self.start} needs {need} "
                "(use more text: --num_samples, or shorter --sequence_lengths / smaller --batch_sizes)"
            )
        rows = torch.stack(
            [self.token_ids[self.start + i * span : self.start + (i + 1) * span] for i in range(batch)]
        )
        return rows[:, :seq_len], rows[:, seq_len:]

    def method(self, compression_ratio: float | None):
        """The KV method of a cell: the full cache (``None``) or ChunkedDecomp at ``compression_ratio``."""
        from chunked_decomp.evaluation.methods import FullCache, chunked_method

        if compression_ratio is None:
            return FullCache()
        return chunked_method(self.preset, compression_ratio, **self.config_overrides)

    # ---- one cell -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_cell(self, compression_ratio: float | None, seq_len: int, batch: int) -> dict[str, Any]:
        """Measure one cell (see the module docstring); ``compression_ratio=None`` is the uncompressed cache."""
        from chunked_decomp.evaluation.memory import MemoryTracker
        from chunked_decomp.evaluation.perplexity import continuation_nll
        from chunked_decomp.evaluation.wired import decode_speed

        model = self.model
        device = next(model.parameters()).device
        context, continuation = (t.to(device) for t in self.windows(seq_len, batch))
        method = self.method(compression_ratio)
        full = self.method(None)

        # Speed first, the uncompressed cache right before the compressed one, so both see the same load.
        ref = full.prefill(model, context)
        base_speed = decode_speed(model, ref.cache, ref.last_logits, seq_len, self.decode_tokens)
        del ref
        with MemoryTracker(cache=None) as tracker:
            prefilled = method.prefill(model, context)
            storage = prefilled.storage
            nll = continuation_nll(model, prefilled.cache, prefilled.last_logits, continuation, seq_len)
            del prefilled
            stats = {}
            if compression_ratio is None:
                speed = base_speed  # the baseline is its own reference: ratio 1 by definition
            else:
                timed = method.prefill(model, context)
                speed = decode_speed(model, timed.cache, timed.last_logits, seq_len, self.decode_tokens)
                stats["compression_seconds"] = float(getattr(timed.cache, "compression_seconds", 0.0))
        config = getattr(method, "config", None)
        mean_nll = nll.mean().item()
        return {
            "method": "full" if compression_ratio is None else "chunked",
            "preset": self.preset or "default",
            "compression_ratio": 1.0 if compression_ratio is None else float(compression_ratio),
            "chunk_size": config.chunk_size if config is not None else None,
            "seq_len": seq_len,
            "batch_size": batch,
            "achieved_ratio": storage.ratio,
            "kv_bytes": storage.stored_bytes,
            "kv_reference_bytes": storage.reference_bytes,
            "kv_bytes_held": storage.cache_bytes,
            "kv_bytes_model_dtype": storage.cache_dtype_bytes,
            "kv_mb": storage.stored_bytes / _MB,
            "memory_reduction_pct": 100.0 * (1.0 - storage.ratio),
            "peak_memory_mb": tracker.get_peak_memory(),
            "peak_memory_increase_mb": tracker.get_peak_increase(),
            "perplexity": math.exp(mean_nll),
            "nll": mean_nll,
            "scored_tokens": nll.numel(),
            "decode_tokens_per_s": speed["tokens_per_s"],
            "baseline_decode_tokens_per_s": base_speed["tokens_per_s"],
            "speed_ratio": speed["tokens_per_s"] / base_speed["tokens_per_s"],
            **stats,
        }

    # ---- the grid -----------------------------------------------------------------------------------------
    def run_scaling_analysis(
        self,
        model_name: str = "smollm2-135m",
        compression_ratios: Sequence[float] = (0.5, 0.25, 0.125),
        sequence_lengths: Sequence[int] = (512, 1024),
        batch_sizes: Sequence[int] = (1,),
    ):
        """Measure every (ratio, sequence length, batch size) cell plus the uncompressed baseline per
        (sequence length, batch size); return the table as a pandas DataFrame (also written as CSV and JSON).

        Columns: ``method`` ("full" or "chunked"), ``preset``, ``compression_ratio`` (target ρ; 1.0 for the
        baseline), ``chunk_size``, ``seq_len``, ``batch_size``, ``achieved_ratio`` (ρ measured), ``kv_bytes``,
        ``kv_reference_bytes`` (16-bit), ``kv_bytes_held`` and ``kv_bytes_model_dtype`` (as held in this process
        vs an uncompressed cache of the model's dtype), ``kv_mb``, ``memory_reduction_pct``, ``peak_memory_mb``,
        ``peak_memory_increase_mb``, ``perplexity``, ``perplexity_increase_pct``, ``decode_tokens_per_s``,
        ``baseline_decode_tokens_per_s``, ``speed_ratio``, ``compression_seconds``, ``cached`` (reused from an
        earlier run).
        """
        import pandas as pd
        from tqdm.auto import tqdm

        ratios = _check_grid(compression_ratios, sequence_lengths, batch_sizes)
        self._load(model_name)
        store = ResultStore(self.output_dir / "cells" / "scaling") if self.output_dir is not None else None
        fingerprint = token_fingerprint(self.token_ids)
        grid = [(None, s, b) for s in sequence_lengths for b in batch_sizes]
        grid += [(r, s, b) for s in sequence_lengths for b in batch_sizes for r in ratios]
        rows: list[dict[str, Any]] = []
        self.cells_computed = self.cells_reused = 0
        bar = tqdm(grid, desc="scaling cells", unit="cell", disable=not self.progress)
        for ratio, seq_len, batch in bar:
            bar.set_postfix_str(f"{'full' if ratio is None else f'ρ={ratio:g}'} seq={seq_len} batch={batch}")
            if store is not None:
                row, cached = store.get_or_compute(
                    self._cell_params(model_name, fingerprint, ratio, seq_len, batch),
                    lambda r=ratio, s=seq_len, b=batch: self.measure_cell(r, s, b),
                )
            else:
                row, cached = self.measure_cell(ratio, seq_len, batch), False
            self.cells_reused += cached
            self.cells_computed += not cached
            rows.append({"model": str(model_name), **row, "cached": cached})
            self.results = self._finish(pd.DataFrame(rows))
            if self.output_dir is not None:
                write_table(self.results, self.output_dir / "scaling_results")
        return self.results

    def _cell_params(
        self, model_name: str, fingerprint: str, ratio: float | None, seq_len: int, batch: int
    ) -> dict[str, Any]:
        """What identifies a cell in the result store: a stored cell is reused only when all of it matches."""
        return {
            "study": "scaling",
            "model": str(model_name),
            "dtype": self.dtype,
            "device": self.device,
            "text": fingerprint,
            "start": self.start,
            "continuation_length": self.continuation_length,
            "decode_tokens": self.decode_tokens,
            "seq_len": seq_len,
            "batch_size": batch,
            "config": None if ratio is None else self.method(ratio).config.to_dict(),
        }

    @staticmethod
    def _finish(frame):
        """Add ``perplexity_increase_pct`` against the baseline of the same sequence length and batch size."""
        base = frame[frame["method"] == "full"].set_index(["seq_len", "batch_size"])["perplexity"]
        keys = list(zip(frame["seq_len"], frame["batch_size"]))
        reference = [base.get(k, float("nan")) for k in keys]
        frame = frame.copy()
        frame["perplexity_increase_pct"] = [
            100.0 * (p / r - 1.0) for p, r in zip(frame["perplexity"], reference)
        ]
        return frame

    # ---- recommendations ----------------------------------------------------------------------------------
    def recommend_optimal_settings(
        self, target_memory_reduction: float, max_quality_loss: float, results: Any = None
    ) -> dict[str, Any]:
        """The cheapest measured setting reaching ``target_memory_reduction`` percent with at most
        ``max_quality_loss`` percent perplexity increase, from ``results`` or the last scaling analysis.
        See :func:`recommend_from_results`."""
        results = self.results if results is None else results
        if results is None:
            raise ValueError("no results yet: run run_scaling_analysis() first or pass results=")
        return recommend_from_results(results, target_memory_reduction, max_quality_loss)

    def plot_scaling(self, save_path: str | Path | None = None) -> Path:
        """Save the scaling plot (KV memory, quality, speed and peak memory against context length)."""
        from chunked_decomp.benchmarking.plots import plot_scaling

        if self.results is None:
            raise ValueError("no results yet: run run_scaling_analysis() first")
        if save_path is None:
            if self.output_dir is None:
                raise ValueError("pass save_path= (no output_dir was given)")
            save_path = self.output_dir / "scaling_analysis.png"
        return plot_scaling(self.results, save_path)
