"""``chunked-decomp benchmark``: scaling over sequence lengths and batch sizes, memory timelines, recommendation.

Writes ``scaling_results.{json,csv}``, ``scaling_analysis.png``, ``recommendation.json`` and ``run_info.json``;
with ``--profile_compression`` (or ``--save_timeline``) ``memory_profile.{json,txt}``, with ``--save_timeline``
``memory_timeline.png``. Finished cells are kept under ``cells/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunked_decomp.cli.context import RunContext, open_run
from chunked_decomp.cli.options import BenchmarkOptions
from chunked_decomp.cli.tables import table

if TYPE_CHECKING:
    from chunked_decomp.benchmarking.benchmark import ComprehensiveBenchmark
    from chunked_decomp.evaluation.profiler import MemoryProfiler

__all__ = ["run"]

COLUMNS = {
    "method": ("method", ""),
    "compression_ratio": ("target ρ", "g"),
    "seq_len": ("seq", "d"),
    "batch_size": ("batch", "d"),
    "achieved_ratio": ("ρ", ".3f"),
    "kv_mb": ("KV MB", ".2f"),
    "memory_reduction_pct": ("mem -%", ".1f"),
    "peak_memory_mb": ("peak MB", ".0f"),
    "perplexity": ("ppl", ".2f"),
    "perplexity_increase_pct": ("ppl +%", "+.2f"),
    "decode_tokens_per_s": ("tok/s", ".1f"),
    "speed_ratio": ("speed ×", ".2f"),
}


def run(options: BenchmarkOptions) -> int:
    """Measure the scaling grid (and the memory profile), write the results and print a summary."""
    from chunked_decomp.io import atomic_write_json

    t0 = time.perf_counter()
    ctx = open_run(options.run, options.model, options.text, options.tokens_needed())
    bench = _benchmark(options, ctx)
    frame = bench.run_scaling_analysis(
        options.model.name, options.ratios, options.sequence_lengths, options.batch_sizes
    )
    plots = [bench.plot_scaling(ctx.out / "scaling_analysis.png")]
    for _, row in frame.iterrows():
        ctx.log_numbers(row)
    targets = options.targets
    recommendation = bench.recommend_optimal_settings(targets.memory_reduction, targets.max_quality_loss)
    atomic_write_json(ctx.out / "recommendation.json", recommendation)
    report = None
    if options.profile:
        report, timeline = _profile(options, ctx, bench)
        plots += timeline
    seconds = time.perf_counter() - t0
    ctx.finish(
        seconds,
        plots,
        frame,
        "scaling_results",
        cells_computed=bench.cells_computed,
        cells_reused=bench.cells_reused,
    )

    print(f"\nScaling analysis on {options.model.name}{' (test mode)' if options.run.test_mode else ''}")
    print(table(frame, COLUMNS))
    if report is not None:
        print("\n" + report)
    print("\n" + recommendation["message"])
    print(
        f"\nwrote {ctx.out}/scaling_results.{{json,csv}}, {', '.join(p.name for p in plots)} in {seconds:.1f} s "
        f"({bench.cells_reused} of {bench.cells_reused + bench.cells_computed} cells reused from an earlier run)"
    )
    return 0


def _benchmark(options: BenchmarkOptions, ctx: RunContext) -> ComprehensiveBenchmark:
    """The benchmark on the loaded model and text, its configs checked first (a bad flag fails before any cell)."""
    from chunked_decomp.benchmarking.benchmark import ComprehensiveBenchmark

    overrides: dict[str, Any] = {"chunk_size": options.chunk_size} if options.chunk_size else {}
    if options.compression.head_weights is not None:
        overrides["head_weights"] = options.compression.head_weights
    for ratio in options.ratios:
        options.compression.config(compression_ratio=ratio, **overrides)
    return ComprehensiveBenchmark(
        ctx.out,
        model=ctx.model,
        tokenizer=ctx.tokenizer,
        token_ids=ctx.ids,
        preset=options.compression.preset,
        config_overrides=overrides,
        continuation_length=options.continuation_length,
        decode_tokens=options.decode_tokens,
        start=options.start,
        dtype=options.model.dtype,
        device=ctx.device,
        progress=ctx.show_progress,
    )


def _profile(
    options: BenchmarkOptions, ctx: RunContext, bench: ComprehensiveBenchmark
) -> tuple[str, list[Path]]:
    """Profile generation, write ``memory_profile.{txt,json}`` (and the timeline plot with ``--save_timeline``);
    returns the text report and the plots written."""
    from chunked_decomp.io import atomic_write_json, atomic_write_text

    profiler = _profile_generation(options, ctx, bench)
    report = profiler.generate_report()
    atomic_write_text(ctx.out / "memory_profile.txt", report + "\n")
    atomic_write_json(ctx.out / "memory_profile.json", profiler.generate_report(as_dict=True))
    if not options.save_timeline:
        return report, []
    title = (
        f"Process memory while generating {options.timeline_tokens} tokens after a "
        f"{options.timeline_context}-token prompt ({options.model.name})"
    )
    return report, [profiler.plot_memory_timeline(ctx.out / "memory_timeline.png", title=title)]


def _profile_generation(
    options: BenchmarkOptions, ctx: RunContext, bench: ComprehensiveBenchmark
) -> MemoryProfiler:
    """Generate ``timeline_tokens`` tokens after a ``timeline_context``-token prompt, uncompressed and at each
    ratio, recording process memory and the cache's bytes after every step."""
    import torch

    from chunked_decomp.evaluation.profiler import MemoryProfiler
    from chunked_decomp.hf.compressor import ChunkedDecomp

    model = ctx.model
    profiler = MemoryProfiler(interval=0.005)
    device = next(model.parameters()).device
    prompt = ctx.ids[options.start : options.start + options.timeline_context].unsqueeze(0).to(device)
    pad = getattr(model.generation_config, "pad_token_id", None)
    kwargs = {"pad_token_id": pad if pad is not None else 0}
    for ratio in ctx.progress([None, *options.ratios], "memory profile"):
        if ratio is None:
            profiler.profile_generate(model, prompt, options.timeline_tokens, "uncompressed", **kwargs)
            continue
        decomp = ChunkedDecomp(config=bench.method(ratio).config)
        with decomp.applied(model), torch.no_grad():
            profiler.profile_generate(
                model, prompt, options.timeline_tokens, f"ChunkedDecomp ρ={ratio:g}", **kwargs
            )
    return profiler
