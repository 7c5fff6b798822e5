"""``chunked-decomp evaluate``: perplexity and generation fidelity per ratio, plots, comparison study, recommendation.

Writes ``evaluate_results.{json,csv}`` (the JSON with the generations of every prompt), with ``--save_plots``
``quality_vs_compression.png`` (and ``comparison.png``), with ``--comparison_study`` ``comparison.{json,csv}``,
with the perplexity metric ``recommendation.json``, and ``run_info.json``. Finished cells are kept under
``cells/evaluate`` and ``cells/comparison``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chunked_decomp.cli.context import RunContext, open_run
from chunked_decomp.cli.options import EvaluateOptions
from chunked_decomp.cli.sweep import cell_params, check_settings, evaluation_row, make_evaluator
from chunked_decomp.cli.tables import table

if TYPE_CHECKING:
    from chunked_decomp.config import CompressionConfig
    from chunked_decomp.evaluation.quality import PerformanceEvaluator

__all__ = ["run"]

# --metrics name → the column of a generation-fidelity metric
METRIC_KEYS = {"bleu": "bleu", "rouge": "rouge_l", "semantic": "semantic_sim"}

COLUMNS = {
    "compression_ratio": ("target ρ", "g"),
    "compression_ratio_achieved": ("ρ", ".3f"),
    "memory_reduction": ("mem -%", ".1f"),
    "perplexity_original": ("ppl full", ".2f"),
    "perplexity_compressed": ("ppl comp", ".2f"),
    "perplexity_increase": ("ppl +%", "+.2f"),
    "bleu": ("BLEU", ".1f"),
    "rouge_l": ("ROUGE-L", ".3f"),
    "semantic_sim": ("semantic", ".3f"),
    "token_agreement": ("tok agree", ".2f"),
    "first_divergence": ("same first", ".1f"),
    "speed_improvement": ("speed ×", ".2f"),
}
COMPARISON_COLUMNS = {
    "method": ("method", ""),
    "ratio": ("ρ", ".3f"),
    "perplexity": ("ppl", ".2f"),
    "increase_pct": ("ppl +%", "+.2f"),
}


def run(options: EvaluateOptions) -> int:
    """Evaluate every ratio, write the results and print a summary; returns the exit code."""
    from chunked_decomp.benchmarking.benchmark import recommend_from_results
    from chunked_decomp.io import atomic_write_json

    t0 = time.perf_counter()
    ctx = open_run(options.run, options.model, options.text, options.protocol.tokens_needed())
    configs = [
        options.compression.config(compression_ratio=r, chunk_size=options.chunk_size) for r in options.ratios
    ]
    check_settings(configs, ctx.model)
    frame = _sweep(options, ctx, configs)
    comparison = _comparison_study(options, ctx) if options.comparison_study else None
    plots = _plots(ctx.out, frame, comparison) if options.save_plots else []
    recommendation = None
    if "perplexity" in options.metrics:
        targets = options.targets
        recommendation = recommend_from_results(frame, targets.memory_reduction, targets.max_quality_loss)
        atomic_write_json(ctx.out / "recommendation.json", recommendation)
    seconds = time.perf_counter() - t0
    ctx.finish(seconds, plots, frame, "evaluate_results")
    _print_summary(options, ctx.out, frame, comparison, recommendation, plots, seconds)
    return 0


def _sweep(options: EvaluateOptions, ctx: RunContext, configs: list[CompressionConfig]) -> Any:
    """Evaluate (or reuse) each ratio, rewriting ``evaluate_results.{json,csv}`` after each one; returns the
    table with the column names the recommendation and the plots read."""
    import pandas as pd

    from chunked_decomp.io import atomic_write_json, write_table

    text_metrics = [METRIC_KEYS[m] for m in options.metrics if m in METRIC_KEYS]
    generate = bool(text_metrics) and options.protocol.generation_tokens > 0
    evaluator = make_evaluator(ctx.tokenizer, options.protocol)
    prompts = options.protocol.prompts(ctx.ids) if generate else []
    store = ctx.store("evaluate")
    common = {**cell_params(ctx, options.model, options.protocol), "metrics": sorted(options.metrics)}
    rows = []
    for cfg in ctx.progress(configs, "evaluate ratios"):
        row, cached = store.get_or_compute(
            {**common, "config": cfg.to_dict()},
            lambda cfg=cfg: _measure(options, cfg, ctx, evaluator, prompts, text_metrics),
        )
        row = {
            "method": "chunked",
            "preset": options.compression.label,
            "compression_ratio": cfg.compression_ratio,
            "chunk_size": cfg.chunk_size,
            **row,
            "cached": cached,
        }
        rows.append(row)
        ctx.log_numbers(row)
        frame = pd.DataFrame([{k: v for k, v in r.items() if k != "per_prompt"} for r in rows])
        write_table(frame, ctx.out / "evaluate_results")
    atomic_write_json(ctx.out / "evaluate_results.json", rows)
    frame["memory_reduction_pct"] = frame["memory_reduction"]
    frame["perplexity_increase_pct"] = frame["perplexity_increase"]
    frame["speed_ratio"] = frame["speed_improvement"]
    return frame


def _measure(
    options: EvaluateOptions,
    cfg: CompressionConfig,
    ctx: RunContext,
    evaluator: PerformanceEvaluator,
    prompts: list,
    text_metrics: list[str],
) -> dict[str, Any]:
    """One ratio: the evaluation, and the generation metrics against the full cache when ``prompts``."""
    from chunked_decomp.hf.compressor import ChunkedDecomp

    model = ctx.model
    decomp = ChunkedDecomp(config=cfg)
    row: dict[str, Any] = {}
    with decomp.applied(model):
        result = evaluator.evaluate_compression(model, model, ctx.ids)
        row.update(evaluation_row(result))
        if "perplexity" not in options.metrics:  # the bytes are still needed; drop what was not asked for
            for key in ("perplexity_original", "perplexity_compressed", "perplexity_increase"):
                row[key] = None
        if prompts:
            gen = evaluator.compare_generations(
                model, model, prompts, options.protocol.generation_tokens, metrics=text_metrics
            )
            row.update({k: v for k, v in gen.items() if not k.endswith("_per_text")})
    return row


def _plots(out: Path, frame: Any, comparison: Any) -> list[Path]:
    from chunked_decomp.benchmarking.plots import plot_comparison, plot_quality

    plots = [plot_quality(frame, out / "quality_vs_compression.png")]
    if comparison is not None:
        plots.append(plot_comparison(comparison, out / "comparison.png"))
    return plots


def _comparison_methods(options: EvaluateOptions) -> list:
    """Full cache, ChunkedDecomp presets and ratios, and the peers that can run here."""
    import importlib.util

    from chunked_decomp.config import load_presets
    from chunked_decomp.evaluation.methods import FullCache, chunked_method
    from chunked_decomp.evaluation.peers import KVPressMethod, kvpress_available

    methods = [FullCache()]
    for preset in ("conservative", "balanced", "aggressive"):
        if preset in load_presets():
            methods.append(chunked_method(preset))
    seen = [m.config.to_dict() for m in methods[1:]]
    overrides: dict[str, Any] = {"chunk_size": options.chunk_size} if options.chunk_size else {}
    if options.compression.head_weights is not None:
        overrides["head_weights"] = options.compression.head_weights
    for ratio in options.ratios:
        method = chunked_method(options.compression.preset, ratio, **overrides)
        if method.config.to_dict() not in seen:  # a ratio that is exactly a preset runs once, under its name
            methods.append(method)
    if (
        importlib.util.find_spec("optimum") is not None
        and importlib.util.find_spec("optimum.quanto") is not None
    ):
        from chunked_decomp.evaluation.peers import QuantizedCacheMethod

        methods += [QuantizedCacheMethod(nbits=4), QuantizedCacheMethod(nbits=2)]
    if kvpress_available():
        for ratio in options.ratios:
            methods += [KVPressMethod("snapkv", ratio), KVPressMethod("knorm", ratio)]
    return methods


def _comparison_study(options: EvaluateOptions, ctx: RunContext) -> Any:
    """Perplexity of every method of :func:`_comparison_methods` on the window at ``start``; writes ``comparison``."""
    import pandas as pd

    from chunked_decomp.evaluation.perplexity import continuation_perplexity
    from chunked_decomp.io import write_table

    protocol = options.protocol
    store = ctx.store("comparison")
    rows = []
    for method in ctx.progress(_comparison_methods(options), "comparison methods"):
        config = getattr(method, "config", None)
        params = {
            "command": "comparison",
            "model": options.model.name,
            "dtype": options.model.dtype,
            "text": ctx.fingerprint,
            "context_length": protocol.context_length,
            "continuation_length": protocol.continuation_length,
            "start": protocol.start,
            "method": method.name,
            "config": config.to_dict() if config is not None else None,
        }

        def compute(method=method) -> dict[str, Any]:
            return continuation_perplexity(
                ctx.model,
                method,
                ctx.ids,
                context_len=protocol.context_length,
                continuation_len=protocol.continuation_length,
                start=protocol.start,
            ).to_dict()

        row, cached = store.get_or_compute(params, compute)
        rows.append({**row, "cached": cached})
    frame = pd.DataFrame(rows)
    base = frame.loc[frame["method"] == "full", "perplexity"].iloc[0]
    frame["increase_pct"] = 100.0 * (frame["perplexity"] / base - 1.0)
    frame = frame.drop(columns=["extra"], errors="ignore")
    write_table(frame, ctx.out / "comparison")
    ctx.tracker.log_table("comparison", frame)
    return frame


def _print_summary(
    options: EvaluateOptions,
    out: Path,
    frame: Any,
    comparison: Any,
    recommendation: dict[str, Any] | None,
    plots: list[Path],
    seconds: float,
) -> None:
    print(
        f"\nQuality vs. compression on {options.model.name}{' (test mode)' if options.run.test_mode else ''}"
    )
    print(table(frame, COLUMNS))
    if comparison is not None:
        print("\nComparison study (continuation protocol, ρ = stored bytes ÷ 16-bit cache):")
        print(table(comparison, COMPARISON_COLUMNS))
    if recommendation is not None:
        print("\n" + recommendation["message"])
    print(
        f"\nwrote {out}/evaluate_results.{{json,csv}}{', ' if plots else ''}{', '.join(p.name for p in plots)} "
        f"in {seconds:.1f} s"
    )
