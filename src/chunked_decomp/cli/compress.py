"""``chunked-decomp compress``: per (ratio × chunk size) setting, compression statistics, quality and memory.

Writes ``compress_results.{json,csv}`` (the JSON with per-layer ranks), ``compression_summary.png``,
``ranks_per_layer.png`` and ``run_info.json``; each finished setting is kept under ``cells/compress``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunked_decomp.cli.context import RunContext, open_run
from chunked_decomp.cli.options import CompressOptions
from chunked_decomp.cli.sweep import cell_params, check_settings, evaluation_row, make_evaluator
from chunked_decomp.cli.tables import summary_line, table

if TYPE_CHECKING:
    from chunked_decomp.config import CompressionConfig
    from chunked_decomp.evaluation.quality import PerformanceEvaluator

__all__ = ["run"]

COLUMNS = {
    "compression_ratio": ("target ρ", "g"),
    "chunk_size": ("chunk", ""),
    "compression_ratio_achieved": ("ρ", ".3f"),
    "kv_bytes_compressed": ("KV bytes", ",d"),
    "memory_reduction": ("mem -%", ".1f"),
    "perplexity_original": ("ppl full", ".2f"),
    "perplexity_compressed": ("ppl comp", ".2f"),
    "perplexity_increase": ("ppl +%", "+.2f"),
    "speed_improvement": ("speed ×", ".2f"),
    "mean_key_rank": ("k rank", ".1f"),
    "mean_value_rank": ("v rank", ".1f"),
    "token_agreement": ("tok agree", ".2f"),
    "compression_seconds": ("comp s", ".2f"),
}


def run(options: CompressOptions) -> int:
    """Measure every setting, write the results and print a summary; returns the exit code."""
    t0 = time.perf_counter()
    ctx = open_run(options.run, options.model, options.text, options.protocol.tokens_needed())
    configs = _settings(options, ctx.model)
    rows, frame = _sweep(options, ctx, configs)
    plots = _write_results(ctx.out, rows, frame)
    seconds = time.perf_counter() - t0
    ctx.finish(seconds, plots, frame, "compress_results")
    _print_summary(options, ctx.out, rows, frame, plots, seconds)
    return 0


def _settings(options: CompressOptions, model: Any) -> list[CompressionConfig]:
    """Every (ratio × chunk size) config, the preset's value where a flag is not given, checked for the model."""
    base = options.compression.config()
    ratios = options.ratios or [base.compression_ratio]
    chunks = options.chunk_sizes or [base.chunk_size]
    configs = [options.compression.config(compression_ratio=r, chunk_size=c) for r in ratios for c in chunks]
    check_settings(configs, model)
    return configs


def _sweep(options: CompressOptions, ctx: RunContext, configs: list[CompressionConfig]) -> tuple[list, Any]:
    """Measure (or reuse) each setting, rewriting ``compress_results.{json,csv}`` after each one;
    returns the rows and their table without the per-layer ranks."""
    import pandas as pd

    from chunked_decomp.io import write_table

    evaluator = make_evaluator(ctx.tokenizer, options.protocol)
    generation_tokens = options.protocol.generation_tokens
    prompts = options.protocol.prompts(ctx.ids) if generation_tokens else []
    store = ctx.store("compress")
    common = cell_params(ctx, options.model, options.protocol)
    rows = []
    for cfg in ctx.progress(configs, "compress settings"):
        row, cached = store.get_or_compute(
            {**common, "config": cfg.to_dict()},
            lambda cfg=cfg: _measure(cfg, ctx, evaluator, prompts, generation_tokens),
        )
        row = {
            "preset": options.compression.label,
            "compression_ratio": cfg.compression_ratio,
            "chunk_size": cfg.chunk_size,
            "generation_tokens": generation_tokens,
            **row,
            "cached": cached,
        }
        rows.append(row)
        ctx.log_numbers(row)
        frame = pd.DataFrame([{k: v for k, v in r.items() if k != "per_layer"} for r in rows])
        write_table(frame, ctx.out / "compress_results")
    return rows, frame


def _measure(
    cfg: CompressionConfig,
    ctx: RunContext,
    evaluator: PerformanceEvaluator,
    prompts: list,
    generation_tokens: int,
) -> dict[str, Any]:
    """One setting: the evaluation, per-layer ranks and bytes, and the greedy generations against the full cache."""
    from chunked_decomp.hf.compressor import ChunkedDecomp

    model = ctx.model
    decomp = ChunkedDecomp(config=cfg)
    with decomp.applied(model):
        result = evaluator.evaluate_compression(model, model, ctx.ids)
        layers = [
            {
                "layer_idx": s.layer_idx,
                "mean_key_rank": s.mean_key_rank,
                "mean_value_rank": s.mean_value_rank,
                "stored_bytes": s.stored_bytes,
            }
            for s in decomp.last_cache.memory_stats().per_layer
        ]
        row = evaluation_row(result)
        if prompts:
            gen = evaluator.compare_generations(model, model, prompts, generation_tokens, metrics=())
            row.update({k: gen[k] for k in ("first_divergence", "token_agreement", "exact_match")})
            row["generation_compressed_tokens"] = sum(
                p["compressed_tokens"] for p in gen["per_prompt"]
            ) / len(prompts)
    row["per_layer"] = layers
    return row


def _write_results(out: Path, rows: list[dict[str, Any]], frame: Any) -> list[Path]:
    """``compress_results.json`` with the per-layer ranks, and the two plots; returns the plots' paths."""
    from chunked_decomp.benchmarking.plots import plot_compression_summary, plot_ranks
    from chunked_decomp.io import atomic_write_json

    atomic_write_json(out / "compress_results.json", rows)
    plots = [plot_compression_summary(frame, out / "compression_summary.png")]
    ranks = {f"ρ={r['compression_ratio']:g}, chunk {r['chunk_size']}": r["per_layer"] for r in rows}
    plots.append(plot_ranks(ranks, out / "ranks_per_layer.png"))
    return plots


def _print_summary(
    options: CompressOptions,
    out: Path,
    rows: list[dict[str, Any]],
    frame: Any,
    plots: list[Path],
    seconds: float,
) -> None:
    print(
        f"\nChunkedDecomp on {options.model.name} ({frame['context_length'].iloc[0]}-token context, "
        f"{frame['scored_tokens'].iloc[0]} scored tokens{', test mode' if options.run.test_mode else ''})"
    )
    for r in rows:
        print(f"  ρ={r['compression_ratio']:g}, chunk {r['chunk_size']}: {summary_line(r)}")
    print()
    print(table(frame, COLUMNS))
    print(
        f"\nwrote {out}/compress_results.{{json,csv}}, {', '.join(p.name for p in plots)} in {seconds:.1f} s "
        f"({sum(r['cached'] for r in rows)} of {len(rows)} settings reused from an earlier run)"
    )
