"""Decode speed and memory at long context: the compressed cache against transformers' `DynamicCache`.

On a model (``--model_name``, SmolLM2-135M by default; float32, CPU, one thread unless ``--threads``), for each context length a
Wikipedia prompt of that many tokens is prefilled, then ``--steps`` single-token decoding steps are timed (greedy,
one forward call each). Caches: ``dynamic`` (uncompressed) and one compressed cache per ``--modes`` entry (the
``--preset``, wired in with ``ChunkedDecomp.applied``): ``rebuild`` (compressed chunks rebuilt each step, the
model's own attention), ``factored`` (attention over the factors: values factored, pre-rotary keys rebuilt) and
``factored_post_rope`` (keys factored after the rotary embedding, so neither is rebuilt), and ``factored_torch``
(``factored`` without the fused kernel: a machine without a compiler). ``factored`` is what ``decode_attention="auto"``
picks on a CPU. The factored modes use the fused CPU kernel (`chunked_decomp.backends.cpu_kernel`) when it builds;
``rebuild`` and ``factored_torch`` are timed without it (the rebuild never builds it). The caches alternate
within each of ``--repeats`` rounds, so all see the same machine load; the table gives medians of the per-step
times, tokens/s and the ratio compressed ÷ dynamic speed (above 1 = faster).
For each run it also records the cache's stored bytes and the process's peak RSS increase over the decoding steps
(`MemoryTracker`), so the transient working set of the rebuild shows next to the bytes saved.

    python benchmarks/decode_speed.py                      # contexts 1024 2048 4096, ~15 min on a 2-core CPU
    python benchmarks/decode_speed.py --contexts 8192      # long: prefill alone takes minutes
    python benchmarks/decode_speed.py --quick              # contexts 512 1024, 8 steps, 1 round
    python benchmarks/decode_speed.py --batch 4 --contexts 4096 --preset fast --modes factored_post_rope
    python benchmarks/decode_speed.py --contexts 4096 --modes rebuild --set basis_sharing=none

``--set KEY=VALUE`` overrides a field of the preset (the value read as YAML).

``--batch N`` decodes N rows at once, each prompt a different stretch of the text (consecutive, non-overlapping).

Prints a table; writes ``benchmarks/results/decode_speed/decode_speed.json`` atomically (last stdout line: the JSON summary).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
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

from chunked_decomp import ChunkedDecomp, CompressionConfig, MemoryTracker
from chunked_decomp.evaluation.memory import cache_nbytes
from chunked_decomp.hf.models import cache_kwarg_name, output_cache

MODES = {
    "rebuild": {},
    "factored": {"decode_attention": "factored"},
    "factored_post_rope": {"decode_attention": "factored", "compress_keys_pre_rope": False},
    # factored without the fused C++ kernel: what a machine without a compiler (or ninja) gets.
    "factored_torch": {"decode_attention": "factored"},
}
#: The modes timed without the fused kernel (the rebuild as a default user gets it: it never builds the kernel).
NO_KERNEL = ("rebuild", "factored_torch")


@contextmanager
def kernel_switch(on: bool) -> Iterator[None]:
    """``CHUNKED_DECOMP_KERNELS=0`` inside the block unless ``on`` (read at every call)."""
    before = os.environ.get("CHUNKED_DECOMP_KERNELS")
    if not on:
        os.environ["CHUNKED_DECOMP_KERNELS"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CHUNKED_DECOMP_KERNELS", None)
        else:
            os.environ["CHUNKED_DECOMP_KERNELS"] = before


@torch.no_grad()
def time_decode(model, prompt: torch.Tensor, steps: int) -> dict:
    """Prefill prompt (batch, P) with the model's default cache, then time ``steps`` greedy single-token steps."""
    with timed() as prefill:
        out = model(input_ids=prompt, use_cache=True)
    cache = output_cache(out)
    name = cache_kwarg_name(model)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    with MemoryTracker(device="cpu") as mt:
        for _ in range(steps):
            with timed() as step:
                out = model(input_ids=token, use_cache=True, **{name: cache})
            times.append(step.seconds)
            token = out.logits[:, -1:].argmax(-1)
    return {
        "prefill_seconds": prefill.seconds,
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "cache_bytes": cache_nbytes(cache),
        "peak_rss_increase_mb": mt.get_peak_increase(),
    }


def parse_args() -> tuple[argparse.Namespace, dict[str, Any], dict[str, CompressionConfig]]:
    """The flags, the ``--set`` overrides and the config of each mode; a bad value exits with status 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", default="balanced")
    parser.add_argument(
        "--modes", nargs="+", default=["rebuild", "factored", "factored_post_rope"], choices=list(MODES)
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded at once (default 1)")
    parser.add_argument("--quick", action="store_true")
    add_overrides_option(parser, "the preset")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/decode_speed/decode_speed.json)"
    )
    args = parser.parse_args()
    for flag in ("steps", "repeats", "threads", "batch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if any(c < 16 for c in args.contexts):
        parser.error(f"--contexts must each be >= 16 tokens, got {args.contexts}")
    overrides = overrides_from(parser, args)
    configs = {m: preset_config(parser, args.preset, **{**overrides, **MODES[m]}) for m in args.modes}
    if args.quick:
        args.contexts, args.steps, args.repeats = [512, 1024], 8, 1
    return args, overrides, configs


def run_rounds(
    model, ids: torch.Tensor, args: argparse.Namespace, configs: dict[str, CompressionConfig]
) -> dict[int, dict[str, list[dict]]]:
    """`time_decode` runs per context and cache, ``--repeats`` rounds, the caches' order reversed every other
    round so that all see the same machine load."""
    kinds = ["dynamic", *args.modes]
    results: dict[int, dict[str, list[dict]]] = {c: {k: [] for k in kinds} for c in args.contexts}
    for rnd in range(args.repeats):
        for ctx in args.contexts:
            prompt = ids[: args.batch * ctx].view(args.batch, ctx)
            for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                if kind in configs:
                    # The rebuild uses the fused kernel's dequantisation only once the factored attention has
                    # built it in the process; time it as a default user gets it, without.
                    with (
                        ChunkedDecomp(config=configs[kind]).applied(model),
                        kernel_switch(kind not in NO_KERNEL),
                    ):
                        r = time_decode(model, prompt, args.steps)
                else:
                    r = time_decode(model, prompt, args.steps)
                results[ctx][kind].append(r)
                print(
                    f"round {rnd + 1} context {ctx} {kind}: {args.batch / r['median_step_seconds']:.2f} tok/s, "
                    f"cache {r['cache_bytes'] / 2**20:.1f} MiB",
                    flush=True,
                )
    return results


def table_rows(results: dict[int, dict[str, list[dict]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per context: tokens/s of all rows, cache MiB and decoding's peak RSS increase (medians) of every cache,
    and each compressed cache's speed ÷ the dynamic one's."""
    rows = []
    for ctx in args.contexts:
        runs = results[ctx]
        med = {k: statistics.median(s for r in v for s in r["step_seconds"]) for k, v in runs.items()}
        mem = {k: statistics.median(r["peak_rss_increase_mb"] for r in v) for k, v in runs.items()}
        row = {"context": ctx}
        for k in ["dynamic", *args.modes]:
            row[f"{k}_tok_s"] = args.batch / med[k]  # tokens of all rows
            row[f"{k}_cache_mib"] = runs[k][-1]["cache_bytes"] / 2**20
            row[f"{k}_decode_peak_rss_increase_mb"] = mem[k]
            if k != "dynamic":
                row[f"{k}_speed_ratio"] = med["dynamic"] / med[k]
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    kinds = ["dynamic", *args.modes]
    print(f"\n{args.model_name} float32 CPU, batch {args.batch}, {args.threads} thread(s), preset {args.preset!r}, "
          f"medians of {args.steps} steps x {args.repeats} round(s); tok/s of all rows (ratio to dynamic)")  # fmt: skip
    print(f"{'context':>7} " + " ".join(f"{k:>26}" for k in kinds) + f" {'cache MiB dyn/compressed':>25}")
    for r in rows:
        cells = [f"{r['dynamic_tok_s']:>26.2f}"] + [
            f"{r[f'{k}_tok_s']:>18.2f} ({r[f'{k}_speed_ratio']:.2f})" for k in args.modes
        ]
        print(
            f"{r['context']:>7} " + " ".join(cells)
            + f" {r['dynamic_cache_mib']:>12.1f}/{r[f'{args.modes[0]}_cache_mib']:<12.1f}"
        )  # fmt: skip


def main() -> None:
    args, overrides, configs = parse_args()
    output = (
        Path(args.output)
        if args.output
        else RESULTS / "decode_speed" / f"decode_speed{'_quick' if args.quick else ''}.json"
    )
    torch.set_num_threads(args.threads)

    model, _, ids = load_model_and_text(
        args.model_name, args.dataset, min_tokens=args.batch * max(args.contexts) + 1, calibrate_heads=True
    )
    results = run_rounds(model, ids, args, configs)
    rows = table_rows(results, args)
    print_table(rows, args)
    summary = {
        "benchmark": "decode_speed",
        "model": args.model_name,
        "dataset": args.dataset,
        "dtype": "float32",
        "preset": args.preset,
        "overrides": overrides,
        "modes": args.modes,
        "threads": args.threads,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        **run_metadata("torch", "machine"),
        "rows": rows,
        "raw": {str(c): v for c, v in results.items()},
    }
    write_results(output, summary, leave_out=("raw",))


if __name__ == "__main__":
    main()
