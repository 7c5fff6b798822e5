"""The fused CPU kernel alone: its functions over a real layer stack's factors, on 1, 2, … threads.

On the default model (SmolLM2-135M, float32, CPU), a Wikipedia prompt of ``--context`` tokens is prefilled into the
``--preset``'s cache with ``decode_attention="factored"``; each layer's `FactoredContext` is then read by the
kernel's functions with random query rows (batch 1, one decoding step: the 3 query heads of each KV head):

* ``scores``: `kernels.scores` (keys factored after the rotary embedding) or `kernels.rope_scores` (pre-rotary keys,
  rebuilt as factored, rotated while scored), with the exact sinks and tail in the same call;
* ``values``: `kernels.values` over softmax weights of the same length, sinks and tail included.

Each round times every function over all layers once per thread count (``--threads``, alternating), ``--rounds``
rounds; the table gives medians in ms per decoding step (all layers) and the speed-up over the first thread count.
A check before timing: every thread count gives the scores of one thread bit for bit and the value sums to 1e-6.

    python benchmarks/kernel_speed.py                               # fast preset, 4,096 tokens, 1 and 2 threads
    python benchmarks/kernel_speed.py --preset balanced --context 8192

Prints a table; writes ``benchmarks/results/decode_speed/kernel_speed_{preset}_{context}.json`` atomically (last stdout line:
the JSON summary).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    add_model_options,
    add_overrides_option,
    load_model_and_text,
    overrides_from,
    preset_config,
    run_metadata,
    timed,
    write_results,
)

from chunked_decomp import ChunkedDecomp, CompressionConfig
from chunked_decomp.backends import cpu_kernel as kernels
from chunked_decomp.hf.models import output_cache


def _scores(ctx, query: torch.Tensor) -> torch.Tensor:
    if ctx.key_packed is not None:
        return kernels.scores(query, ctx.key_packed, ctx.sink_keys, ctx.tail_keys)
    return kernels.rope_scores(query, ctx.keys, *ctx.keys_rope, ctx.sink_keys, ctx.tail_keys)


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace, dict[str, Any], CompressionConfig]:
    """The parser (later checks refuse through it too), the flags, the ``--set`` overrides and the config."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=9)
    add_overrides_option(parser, "the preset")
    parser.add_argument(
        "--output",
        default=None,
        help="JSON path (default benchmarks/results/decode_speed/kernel_speed_*.json)",
    )
    args = parser.parse_args()
    if args.context < 512:
        parser.error(f"--context must be >= 512 tokens (some chunks must be compressed), got {args.context}")
    if args.rounds < 1 or any(t < 1 for t in args.threads):
        parser.error(f"--rounds and --threads must be >= 1, got {args.rounds} and {args.threads}")
    overrides = overrides_from(parser, args)
    config = preset_config(parser, args.preset, **{**overrides, "decode_attention": "factored"})
    if not kernels.available():
        parser.error("the fused kernel could not be built here (a C++ compiler and ninja are needed)")
    return parser, args, overrides, config


def layer_contexts(model, ids: torch.Tensor, config: CompressionConfig, context: int) -> list:
    """Each layer's `FactoredContext` after prefilling ``ids[:context]`` into the compressed cache."""
    with torch.no_grad(), ChunkedDecomp(config=config).applied(model):
        cache = output_cache(model(input_ids=ids[None, :context], use_cache=True))
        return [layer.factored_context() for layer in cache.layers]


def kernel_calls(model, contexts: list) -> Callable[[str], list[torch.Tensor]]:
    """``run(kind)``: the kernel's ``"scores"`` or ``"values"`` over every layer, on fixed random query rows
    (batch 1, one decoding step: the query heads of each KV head) and softmax weights of the same length."""
    heads = model.config.num_attention_heads // model.config.num_key_value_heads
    g = torch.Generator().manual_seed(0)
    queries = [
        torch.randn(1, c.tail_keys.shape[1], heads, c.tail_keys.shape[-1], generator=g) for c in contexts
    ]
    probs = [torch.softmax(_scores(c, q), dim=-1) for c, q in zip(contexts, queries)]

    def run(kind: str) -> list[torch.Tensor]:
        if kind == "scores":
            return [_scores(c, q) for c, q in zip(contexts, queries)]
        return [
            kernels.values(p, c.value_packed, c.sink_values, c.tail_values) for c, p in zip(contexts, probs)
        ]

    return run


def check_threads(run: Callable[[str], list[torch.Tensor]], threads: list[int]) -> None:
    """Every thread count gives the scores of the first bit for bit and the value sums to 1e-6."""
    reference = {kind: run(kind) for kind in ("scores", "values")}
    for n in threads:
        torch.set_num_threads(n)
        assert all(torch.equal(a, b) for a, b in zip(run("scores"), reference["scores"])), n
        for a, b in zip(run("values"), reference["values"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def time_rounds(
    run: Callable[[str], list[torch.Tensor]], threads: list[int], rounds: int
) -> dict[str, dict[int, list[float]]]:
    """Seconds of every function over all layers, per thread count, alternating within each round."""
    times: dict[str, dict[int, list[float]]] = {k: {t: [] for t in threads} for k in ("scores", "values")}
    for _ in range(rounds):
        for n in threads:
            torch.set_num_threads(n)
            for kind in times:
                with timed() as t:
                    run(kind)
                times[kind][n].append(t.seconds)
    return times


def table_rows(times: dict[str, dict[int, list[float]]], first: int, keys: str) -> list[dict[str, Any]]:
    """Median ms per decoding step and the speed-up over ``first`` threads, per function and thread count."""
    rows = []
    for kind, by_threads in times.items():
        base = statistics.median(by_threads[first])
        for threads, samples in by_threads.items():
            ms = statistics.median(samples) * 1e3
            rows.append({"function": keys if kind == "scores" else kind, "threads": threads, "ms_per_step": ms,
                         "speedup": base * 1e3 / ms})  # fmt: skip
    return rows


def main() -> None:
    parser, args, overrides, config = parse_args()
    output = (
        Path(args.output)
        if args.output
        else RESULTS / "decode_speed" / f"kernel_speed_{args.preset}_{args.context}.json"
    )

    torch.set_num_threads(args.threads[0])
    model, _, ids = load_model_and_text(args.model_name, args.dataset, min_tokens=args.context + 1)
    contexts = layer_contexts(model, ids, config, args.context)
    if any(c.value_packed is None or (c.key_packed is None and c.keys_rope is None) for c in contexts):
        parser.error(
            f"preset {args.preset!r}: the kernel reads quantised factors of fusable layout; set use_quantization=true"
        )
    run = kernel_calls(model, contexts)
    check_threads(run, args.threads)
    times = time_rounds(run, args.threads, args.rounds)

    keys = "scores" if contexts[0].key_packed is not None else "rope_scores"
    rows = table_rows(times, args.threads[0], keys)
    print(f"\nSmolLM2-135M float32 CPU, preset {args.preset!r}, {args.context} tokens, {len(contexts)} layers, "
          f"medians of {args.rounds} rounds (ms per decoding step, all layers)")  # fmt: skip
    print(f"{'function':>12} {'threads':>8} {'ms':>8} {'speed-up':>9}")
    for r in rows:
        print(f"{r['function']:>12} {r['threads']:>8} {r['ms_per_step']:>8.2f} {r['speedup']:>8.2f}x")
    summary = {
        "benchmark": "kernel_speed",
        "model": args.model_name,
        "dataset": args.dataset,
        "preset": args.preset,
        "overrides": overrides,
        "context": args.context,
        "rounds": args.rounds,
        **run_metadata("torch", "machine"),
        "rows": rows,
        "raw": {k: {str(t): v for t, v in by.items()} for k, by in times.items()},
    }
    write_results(output, summary, leave_out=("raw",))


if __name__ == "__main__":
    main()
