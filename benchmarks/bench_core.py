"""Core benchmark: bytes, perplexity, generation fidelity and compression time (``--model_name``, ``--dataset``).

Protocol (docs/results.md, "How it is measured"): SmolLM2-135M (float32, CPU), Wikipedia text; a 1,024-token context is prefilled and
compressed, then the next 512 tokens are scored teacher-forced against it. One window is a noisy measure (at
ρ 0.125 single windows range from -0.2% to +4.9%), so the protocol runs on ``--windows`` windows 10,000 tokens
apart (the first at token 5,000, the window of earlier reports) and gives the first window's increase, the pooled
increase (mean log-perplexity) and the worst window. Budgets ρ are relative to a 16-bit
cache (the literature's convention); the float32 cache the CPU model really keeps is twice as large, so both
ratios are reported. Then greedy generation of 128 tokens after a 1,500-token prompt, compressed vs. not: tokens
agreeing before the first difference and in total; and the time spent compressing vs. the forward passes
(prefill: median of ``--timing_runs`` runs).

    python benchmarks/bench_core.py                      # full run (a few minutes on 2 cores)
    python benchmarks/bench_core.py --quick              # smaller, for a smoke test
    python benchmarks/bench_core.py --budgets 0.125 --set rank_allocation=per_layer --recall_windows 3
    python benchmarks/bench_core.py --budgets 0.125 --calibrate --recall_windows 3
    python benchmarks/bench_core.py --budgets 0.125 --set head_weights=auto --recall_windows 3 --skip_generation
    python benchmarks/bench_core.py --preset long_context --budgets 0.25 --first_window 205000 --recall_windows 8
    python benchmarks/bench_core.py --budgets 0.25 --context_len 4096 --windows 4 --skip_generation

``--set KEY=VALUE`` overrides a field of each budget's preset (the value read as YAML); ``--calibrate`` sets
``head_weights`` from :func:`chunked_decomp.evaluation.calibration.head_sensitivity` on tokens 1,000-2,535 and
3,000-4,535 (before the first window, and apart from the recall filler), while ``--set head_weights=auto`` uses
the weights shipped with the package (calibrated on tokens 474,000-545,536, far from every window here);
``--recall_windows N`` adds the recall
protocol (docs/results.md) at the first N window starts. ``--first_window`` moves the windows (e.g. to 205,000:
windows held out from the ones the presets were chosen on; keep them below 474,000).

Prints a table and writes JSON (last line of stdout is the JSON summary too).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from common import (
    add_model_options,
    add_overrides_option,
    load_model_and_text,
    overrides_from,
    timed,
    write_results,
)

from chunked_decomp import ChunkedDecomp, CompressionConfig
from chunked_decomp.config.head_weights import resolve_head_weights
from chunked_decomp.evaluation.methods import ChunkedDecompMethod, FullCache
from chunked_decomp.evaluation.perplexity import PerplexityResult, continuation_perplexity, recall_perplexity


def generation_agreement(model, cd: ChunkedDecomp, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy tokens of the compressed model vs. the uncompressed one after ``prompt`` (1, n)."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    mask = torch.ones_like(prompt)
    with timed() as plain:
        ref = model.generate(prompt, attention_mask=mask, **gen)[0, prompt.shape[1] :]
    with cd.applied(model), timed() as compressed:
        out = model.generate(prompt, attention_mask=mask, **gen)[0, prompt.shape[1] :]
    cache = cd.last_cache
    same = (ref == out).tolist()
    first_diff = same.index(False) if False in same else len(same)
    comp = cache.compression_seconds
    return {
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "agree_before_first_difference": first_diff,
        "agree_total": int(sum(same)),
        "generate_seconds_uncompressed": plain.seconds,
        "generate_seconds_compressed": compressed.seconds,
        "compression_seconds": comp,
        "compression_share_of_forward": comp / max(compressed.seconds - comp, 1e-9),
        "stored_ratio_16bit": cache.memory_stats().reference_ratio,
    }


PRESET_FOR_BUDGET = {0.5: "conservative", 0.25: "balanced", 0.125: "aggressive", 0.0625: "extreme"}


def window_starts(n: int, first: int = 5000) -> list[int]:
    """Start offsets of ``n`` context + continuation windows, 10,000 tokens apart from token ``first``."""
    return [first + 10000 * i for i in range(n)]


@dataclass(frozen=True)
class Layout:
    """Token counts of the run: context and continuation per window, the generation prompt and its new tokens,
    and where the windows (and the recall protocol's) start."""

    context_len: int
    cont_len: int
    prompt_len: int
    new_tokens: int
    starts: list[int]
    recall_starts: list[int]
    model: str = "smollm2-135m"
    dataset: str = "wikipedia"

    @classmethod
    def of(cls, args: argparse.Namespace) -> Layout:
        context_len, cont_len, prompt_len, new_tokens = (
            (512, 128, 600, 32) if args.quick else (1024, 512, 1500, 128)
        )
        if args.context_len is not None:
            context_len = args.context_len
        starts = window_starts(1 if args.quick else args.windows, args.first_window)
        recall = starts[: args.recall_windows]
        return cls(
            context_len, cont_len, prompt_len, new_tokens, starts, recall, args.model_name, args.dataset
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        default=None,
        help="preset whose options are used at every budget (default: conservative at 0.5, balanced at 0.25, "
        "aggressive at 0.125, extreme at 0.0625, balanced elsewhere)",
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--windows", type=int, default=8, help="context + continuation windows (default 8)")
    parser.add_argument(
        "--first_window",
        type=int,
        default=5000,
        help="first token of the first window (default 5,000; windows are 10,000 tokens apart). Another value "
        "gives windows held out from the ones the presets were chosen on; stay below 474,000, where the shipped "
        "head weights were calibrated",
    )
    parser.add_argument("--quick", action="store_true", help="context 512 / continuation 128 / 32 new tokens")
    parser.add_argument(
        "--context_len",
        type=int,
        default=None,
        help="context tokens compressed per window (default 1,024; the recall protocol keeps its own layout)",
    )
    parser.add_argument(
        "--timing_runs", type=int, default=5, help="prefill timings per budget (median reported)"
    )
    add_model_options(parser)
    add_overrides_option(parser, "the preset at every budget")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="head_weights from head_sensitivity on tokens 1,000-4,535 (calibration text before the windows)",
    )
    parser.add_argument(
        "--calibration_power",
        type=float,
        default=0.5,
        help="power of the calibrated head weights (head_sensitivity's power; default 0.5)",
    )
    parser.add_argument(
        "--recall_windows", type=int, default=0, help="recall protocol at the first N window starts"
    )
    parser.add_argument("--skip_generation", action="store_true", help="no greedy-generation comparison")
    parser.add_argument("--output", default="benchmarks/results/quality/bench_core.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: immune to the collapse of threads on busy cores)",
    )
    return parser


def parse_args() -> tuple[argparse.Namespace, dict[str, Any]]:
    """The flags and the ``--set`` overrides; a bad value exits with status 2 naming its flag."""
    parser = build_parser()
    args = parser.parse_args()
    if args.windows < 1:
        parser.error(f"--windows must be >= 1, got {args.windows}")
    if args.context_len is not None and args.context_len < 64:
        parser.error(f"--context_len must be >= 64, got {args.context_len}")
    if args.first_window < 0:
        parser.error(f"--first_window must be >= 0, got {args.first_window}")
    if args.timing_runs < 1:
        parser.error(f"--timing_runs must be >= 1, got {args.timing_runs}")
    overrides = overrides_from(parser, args)
    if args.recall_windows > args.windows:
        parser.error(f"--recall_windows ({args.recall_windows}) must not exceed --windows ({args.windows})")
    # Unknown presets and bad overrides fail here, before minutes of work.
    CompressionConfig.from_preset(args.preset or "balanced", **overrides)
    return args, overrides


def prefill_timings(
    model, config: CompressionConfig, ctx: torch.Tensor, runs: int
) -> list[tuple[float, float]]:
    """(compression seconds ÷ forward seconds, compression seconds) of ``runs`` prefills of ``ctx`` (1, n), each
    compressing every chunk; several runs, since a shared machine makes single timings swing by ±10%."""
    timings = []
    for _ in range(runs):
        cd = ChunkedDecomp(config=config)
        with torch.no_grad(), cd.applied(model), timed() as total:
            model(ctx, use_cache=True)
            cd.last_cache.compress_all()
        comp = cd.last_cache.compression_seconds
        timings.append((comp / max(total.seconds - comp, 1e-9), comp))
    return timings


def increases(results: list[PerplexityResult], base: list[PerplexityResult]) -> list[float]:
    """Perplexity increase of each window over the uncompressed one, percent."""
    return [100 * (r.perplexity / b.perplexity - 1) for r, b in zip(results, base)]


def quality_fields(
    model, method: ChunkedDecompMethod, ids: torch.Tensor, rho: float, layout: Layout, base: dict
) -> dict[str, Any]:
    """Bytes and perplexity increases of ``method`` on every window (and recall window) of ``layout``;
    ``base``: the uncompressed results (``windows``, ``recall``)."""
    starts, context_len, cont_len = layout.starts, layout.context_len, layout.cont_len
    res = [continuation_perplexity(model, method, ids, context_len, cont_len, start=s) for s in starts]
    window_increases = increases(res, base["windows"])
    recall = [recall_perplexity(model, method, ids, start=s) for s in layout.recall_starts]
    recall_increases = increases(recall, base["recall"])
    # Every window scores the same number of tokens, so the pooled perplexity is the mean log-perplexity.
    base_log = [math.log(b.perplexity) for b in base["windows"]]
    pooled = 100 * (
        math.exp(sum(math.log(r.perplexity) for r in res) / len(res) - sum(base_log) / len(base["windows"]))
        - 1
    )
    return {
        "stored_bytes": res[0].stored_bytes,
        "ratio_vs_16bit": res[0].ratio,
        "ratio_vs_float32": res[0].ratio_cache_dtype,
        "budget_error_pct": 100 * (res[0].ratio / rho - 1),
        "perplexity": res[0].perplexity,
        "perplexity_increase_pct": window_increases[0],
        "pooled_perplexity_increase_pct": pooled,
        "mean_perplexity_increase_pct": sum(window_increases) / len(window_increases),
        "worst_perplexity_increase_pct": max(window_increases),
        "window_starts": starts,
        "window_perplexity_increase_pct": window_increases,
        "recall_window_starts": layout.recall_starts,
        "recall_perplexity_increase_pct": recall_increases,
        "first_recall_increase_pct": recall_increases[0] if recall_increases else None,
        "mean_recall_increase_pct": sum(recall_increases) / len(recall_increases)
        if recall_increases
        else None,
    }


def budget_row(
    model,
    ids: torch.Tensor,
    rho: float,
    args: argparse.Namespace,
    overrides: dict,
    layout: Layout,
    base: dict,
) -> dict[str, Any]:
    """Every measurement at budget ``rho``: quality (:func:`quality_fields`), prefill compression time and the
    greedy-generation comparison."""
    preset = args.preset or PRESET_FOR_BUDGET.get(rho, "balanced")
    config = CompressionConfig.from_preset(
        preset, **{**overrides, "compression_ratio": rho, "reference_dtype": "float16"}
    )
    quality = quality_fields(model, ChunkedDecompMethod(config), ids, rho, layout, base)
    # Compression time vs. forward time of the same prefill, in the same process: the median share of the runs.
    timings = prefill_timings(
        model, config, ids[5000 : 5000 + layout.context_len].unsqueeze(0), args.timing_runs
    )
    prefill_share, prefill_comp = sorted(timings)[len(timings) // 2]
    prompt = ids[20000 : 20000 + layout.prompt_len].unsqueeze(0)
    gen = (
        {}
        if args.skip_generation
        else generation_agreement(model, ChunkedDecomp(config=config), prompt, layout.new_tokens)
    )
    return {
        "budget_16bit": rho,
        "preset": preset,
        "overrides": {
            k: v for k, v in overrides.items() if not (k == "head_weights" and isinstance(v, list))
        },
        "calibrated_head_weights": args.calibrate,
        "calibration_power": args.calibration_power if args.calibrate else None,
        **quality,
        "prefill_compression_seconds": prefill_comp,
        "prefill_compression_share": prefill_share,
        "prefill_compression_shares_all_runs": [t[0] for t in timings],
        **{f"gen_{k}": v for k, v in gen.items()},
    }


def print_table(rows: list[dict], layout: Layout, base: dict, skip_generation: bool) -> None:
    starts, new_tokens = layout.starts, layout.new_tokens
    print(
        f"\n{layout.model} on {layout.dataset}, float32 CPU, context {layout.context_len}, "
        f"continuation {layout.cont_len}, "
        f"{len(starts)} window(s) from token {starts[0]}"
    )
    print(f"baseline perplexity {base['windows'][0].perplexity:.3f} (first window)")
    head = (
        f"{'ρ16':>6} {'preset':>12} {'stored/16bit':>12} {'stored/fp32':>11} {'Δppl 1st':>8} {'pooled':>7} "
        f"{'worst':>7} {'recall 1st':>10} {'recall mean':>11} {'agree1st':>8} {'agreeAll':>8} "
        f"{'comp/fwd prefill':>16} {'comp/fwd gen':>12}"
    )
    print(head)
    pct = lambda x, w: f"{x:>+{w - 1}.1f}%" if x is not None else f"{'-':>{w}}"  # noqa: E731
    for r in rows:
        gen = (
            f"{r['gen_agree_before_first_difference']:>4}/{new_tokens:<3} {r['gen_agree_total']:>4}/{new_tokens:<3} "
            if not skip_generation
            else f"{'-':>8} {'-':>8} "
        )
        gen_share = (
            f"{100 * r['gen_compression_share_of_forward']:>11.1f}%" if not skip_generation else f"{'-':>12}"
        )
        print(
            f"{r['budget_16bit']:>6.3f} {r['preset']:>12} {r['ratio_vs_16bit']:>12.4f} {r['ratio_vs_float32']:>11.4f} "
            f"{r['perplexity_increase_pct']:>+7.2f}% {r['pooled_perplexity_increase_pct']:>+6.2f}% "
            f"{r['worst_perplexity_increase_pct']:>+6.2f}% "
            f"{pct(r['first_recall_increase_pct'], 10)} {pct(r['mean_recall_increase_pct'], 11)} "
            f"{gen}{100 * r['prefill_compression_share']:>15.1f}% {gen_share}"
        )


def main() -> None:
    args, overrides = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = Layout.of(args)
    context_len, cont_len = layout.context_len, layout.cont_len

    model, _, ids = load_model_and_text(args.model_name, args.dataset, calibrate_heads=True)
    base = {
        "windows": [
            continuation_perplexity(model, FullCache(), ids, context_len, cont_len, start=s)
            for s in layout.starts
        ],
        "recall": [recall_perplexity(model, FullCache(), ids, start=s) for s in layout.recall_starts],
    }
    if args.calibrate:
        from chunked_decomp.evaluation.calibration import head_sensitivity

        overrides["head_weights"] = head_sensitivity(
            model,
            ids,
            starts=(1000, 3000),
            context_len=context_len,
            continuation_len=cont_len,
            power=args.calibration_power,
        )
    rows = []
    for rho in args.budgets:
        rows.append(budget_row(model, ids, rho, args, overrides, layout, base))
        print(json.dumps(rows[-1]), flush=True)

    print_table(rows, layout, base, args.skip_generation)
    summary = {
        "benchmark": "core_budget",
        "model": args.model_name,
        "dataset": args.dataset,
        "context_len": context_len,
        "continuation_len": cont_len,
        "baseline_perplexity": base["windows"][0].perplexity,
        "baseline_window_perplexities": [b.perplexity for b in base["windows"]],
        "baseline_recall_perplexities": [b.perplexity for b in base["recall"]],
        # "auto" or a file: the weights it stood for on this model, and the file's record of how it was made.
        "head_weights": resolve_head_weights(overrides.get("head_weights"), model.config),
        "head_weights_option": (
            overrides["head_weights"] if isinstance(overrides.get("head_weights"), str) else None
        ),
        "threads": args.threads,
        "rows": rows,
    }
    write_results(args.output, summary)


if __name__ == "__main__":
    main()
