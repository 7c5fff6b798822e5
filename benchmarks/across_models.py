"""The presets on a model and text, as a user gets them: continuation and recall on windows chosen by nobody.

For each preset: 1,024-token contexts compressed whole (``compress_all``), the next 512 tokens scored; the
increase in perplexity pooled over ``--windows`` windows 10,000 tokens apart (mean log-perplexity) and the
worst window; recall (a passage repeated after 512 tokens of other text) as the mean over ``--recall_windows``.
The model is loaded as ``compress_model(model, tokenizer)`` would wire it: ``head_weights: auto`` finds the
shipped file where one fits, else weights measured on the Python language reference. ``--no_head_file`` ignores
a shipped file, to see what a model without one gets. Bytes are ρ16: what the cache holds ÷ a 16-bit cache.

    python benchmarks/across_models.py --model_name qwen2.5-coder-0.5b --dataset python --first_window 45000 \\
        --windows 3 --output benchmarks/results/across_models/qwen_python.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from common import add_model_options, load_model, run_metadata, text_token_ids, write_results

PRESETS = ("conservative", "balanced", "long_context", "fast", "aggressive", "extreme")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, metavar="PRESET")
    parser.add_argument("--windows", type=int, default=4, help="continuation windows (default 4)")
    parser.add_argument("--recall_windows", type=int, default=4, help="recall windows (default 4)")
    parser.add_argument(
        "--first_window", type=int, default=205_000, help="first context token (default 205000)"
    )
    parser.add_argument("--no_head_file", action="store_true", help="ignore a shipped head-weight file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.windows < 1 or args.recall_windows < 0 or args.first_window < 0:
        parser.error("--windows must be >= 1, --recall_windows and --first_window >= 0")
    if args.recall_windows > args.windows:
        parser.error("--recall_windows must be at most --windows (they share the windows' starts)")

    import torch

    from chunked_decomp import CompressionConfig
    from chunked_decomp.evaluation.methods import ChunkedDecompMethod, FullCache
    from chunked_decomp.evaluation.perplexity import continuation_perplexity, recall_perplexity
    from chunked_decomp.hf.calibration import calibrate_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model_name, calibrate_heads=True)
    started = time.perf_counter()
    weights = calibrate_model(model, tokenizer) if args.no_head_file else None
    calibration_seconds = time.perf_counter() - started if args.no_head_file else None
    span = 1024 + 512
    starts = [args.first_window + 10_000 * i for i in range(args.windows)]
    ids = text_token_ids(tokenizer, args.dataset, min_tokens=starts[-1] + span)

    def run(method):
        cont = [continuation_perplexity(model, method, ids, 1024, 512, start=s) for s in starts]
        rec = [recall_perplexity(model, method, ids, start=s) for s in starts[: args.recall_windows]]
        return cont, rec

    base_cont, base_rec = run(FullCache())
    rows = []
    for preset in args.presets:
        overrides = {"head_weights": weights} if weights is not None else {}
        config = CompressionConfig.from_preset(preset, **overrides)
        cont, rec = run(ChunkedDecompMethod(config))
        increases = [100 * (c.perplexity / b.perplexity - 1) for c, b in zip(cont, base_cont)]
        pooled = 100 * (math.exp(sum(math.log(1 + x / 100) for x in increases) / len(increases)) - 1)
        recall = [100 * (r.perplexity / b.perplexity - 1) for r, b in zip(rec, base_rec)]
        row = {
            "preset": preset,
            "budget": config.compression_ratio,
            "rho16": max(c.ratio for c in cont),
            "continuation_pooled_pct": round(pooled, 3),
            "continuation_worst_pct": round(max(increases), 3),
            "continuation_pct": [round(x, 3) for x in increases],
            "recall_mean_pct": round(sum(recall) / len(recall), 2) if recall else None,
            "recall_pct": [round(x, 2) for x in recall],
        }
        rows.append(row)
        print(
            f"{preset:13s} rho16 {row['rho16']:.4f}  continuation {pooled:+.2f}% (worst {max(increases):+.2f}%)"
            + (f"  recall {row['recall_mean_pct']:+.1f}%" if recall else ""),
            flush=True,
        )
    summary = {
        "benchmark": "across_models",
        "model_name": args.model_name,
        "dataset": args.dataset,
        "starts": starts,
        "recall_windows": args.recall_windows,
        "head_weights": "measured on pydoc (no file)" if args.no_head_file else "auto",
        "calibration_seconds": calibration_seconds,
        "baseline_perplexity": [round(b.perplexity, 4) for b in base_cont],
        "baseline_recall_perplexity": [round(b.perplexity, 4) for b in base_rec],
        "rows": rows,
        **run_metadata("torch", "transformers", "python", "machine", "cpus", "threads", "library"),
    }
    write_results(args.output, summary)
    return summary


if __name__ == "__main__":
    main()
