"""Peak process memory of generation at long context: the compressed cache against transformers' `DynamicCache`.

On the default model (SmolLM2-135M, float32, CPU, one thread unless ``--threads``), for each context length, cache
(``dynamic`` = transformers' uncompressed `DynamicCache`, and each compressed preset of ``--caches``, wired in with
``ChunkedDecomp.applied``), protocol and malloc setting, a fresh Python process (this script with ``--worker``)
loads the model, takes a Wikipedia prompt of that many tokens (``ids[--offset : --offset + context]``), runs one
16-token forward call (the weights are memory-mapped: that first call pages in ~0.5 GB, a one-off cost that is not
the cache's; ``--cold`` skips it), returns freed heap to the system (glibc ``malloc_trim``), records its RSS (the
baseline) and then measures the peak RSS of the run with `MemoryTracker` (the kernel's ``VmHWM``, reset at the
start, plus 5 ms samples). One process per run, so one run's freed memory cannot hide the next one's peak.

Protocols:

* ``generate``: ``model.generate(prompt, max_new_tokens=--new_tokens, do_sample=False)`` — one prefill of the whole
  prompt, where the model's activations (MLP and attention temporaries over every prompt token) may outweigh the
  cache on this small model;
* ``chunked`` (chunked prefill): the prompt fed through the model ``--prefill_chunk`` tokens at a time into the
  same cache (``logits_to_keep=1``), then ``--new_tokens`` greedy tokens one forward call at a time (the first from
  the prefill, as generate does). Activations are bounded by the piece, so the cache's growth shows.

Malloc settings (``--mallocs``): ``default`` is glibc as it comes: its mmap threshold rises to the size of each
large block freed (up to 32 MB), so later blocks come from the heap, and freed heap stays resident — the RSS a user
sees, but it counts memory already freed. ``mmap`` sets ``MALLOC_MMAP_THRESHOLD_=131072``: each block of 128 KiB or
more is its own mapping, unmapped when freed, so the RSS follows the bytes really alive.

Recorded per run: baseline RSS, peak RSS, peak increase (peak − baseline), the KV cache's exact bytes at the end
(`cache_nbytes`: factors, scales and exact tokens of the compressed cache, tensors of `DynamicCache`) and wall
seconds. Sizes are in MB = 2**20 bytes. The tables give medians over ``--repeats`` rounds (caches alternate order
between rounds) and the ratios compressed ÷ dynamic.

Longest context within a budget: for each cache, protocol and malloc setting, a least-squares line
peak increase ≈ a + b·context through the measured contexts (at least two) is solved for ``--budget_mb``
(default: DynamicCache's chunked-prefill peak increase at 4,096 tokens under the first malloc setting, or at the
smallest context measured when 4,096 is not). This is an extrapolation from a linear fit, printed next to the
slope of the exact KV bytes; ``--verify`` checks it with one real chunked-prefill run per compressed cache at its
predicted length (first malloc setting, at most ``--verify_max_context`` tokens).

    python benchmarks/memory_peak.py                                  # contexts 4096 8192: ~27 min, 2-core CPU
    python benchmarks/memory_peak.py --mallocs default --verify       # ~12 min + the verification runs
    python benchmarks/memory_peak.py --quick                          # contexts 1024 2048, 4 new tokens, ~6 min

Prints tables; writes ``benchmarks/results/memory/memory_peak.json`` atomically (last stdout line: the JSON summary).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS,
    add_model_options,
    library_info,
    load_model,
    load_model_and_text,
    run_metadata,
    timed,
    write_results,
)

from chunked_decomp import ChunkedDecomp, CompressionConfig, MemoryTracker, load_presets
from chunked_decomp.evaluation.memory import cache_nbytes, current_rss_bytes
from chunked_decomp.hf.models import cache_kwarg_name
from chunked_decomp.io import atomic_write_json

_MB = 1024 * 1024
PROTOCOLS = {"generate": "generate", "chunked": "chunked prefill"}
# glibc settings of the run's process. "default": glibc as it comes, whose mmap threshold rises (up to 32 MB) each
# time a large block is freed, so later blocks of that size come from the heap and stay resident after free.
# "mmap": every block of 128 KiB or more is its own mapping, returned to the system when freed (setting the
# threshold turns the rise off), so the RSS follows the bytes really alive.
MALLOCS = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
DEFAULT_BUDGET_CONTEXT = 4096


# ---- one run, in a fresh process ----------------------------------------------------------------------------
def _malloc_trim() -> bool:
    """Hand freed heap pages back to the system (glibc), so the baseline RSS holds only live memory and memory
    freed while loading cannot absorb the run's allocations. False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _rss_kinds() -> dict[str, int]:
    """Anonymous and file-backed resident memory of this process in kB (Linux ``/proc/self/status``)."""
    kinds = {}
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            name = line.split(":")[0]
            if name in ("RssAnon", "RssFile", "RssShmem"):
                kinds[name] = int(line.split()[1])
    return kinds


def _kept_bytes_per_token(cache: Any) -> float:
    """Bytes per token (all layers) of what a cache keeps for good: the sinks and compressed chunks of a
    `ChunkedSVDCache` (its exact residual window excluded), every token of any other cache."""
    stats = getattr(cache, "memory_stats", None)
    if not callable(stats):
        return cache_nbytes(cache) / max(int(cache.get_seq_length()), 1)
    layer = next(layer for layer in cache.layers if hasattr(layer, "chunks"))
    tokens = layer.sink_length + layer.compressed_length
    return sum(s.aged_stored_bytes for s in stats().per_layer) / max(tokens, 1)


@torch.no_grad()
def _generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache: Any) -> list[int]:
    """``model.generate`` greedy on prompt (1, P) long; ``cache`` None lets the (wrapped) model build its own."""
    kwargs = {} if cache is None else {cache_kwarg_name(model): cache}
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **kwargs,
    )
    return out[0, prompt.shape[1] :].tolist()


@torch.no_grad()
def _chunked(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache: Any, piece: int
) -> tuple[list[int], float]:
    """Prefill prompt (1, P) ``piece`` tokens per forward call into ``cache``, then decode greedily one token per
    call; ``new_tokens`` tokens in all (the first from the prefill). Returns the tokens and the prefill seconds."""
    name = cache_kwarg_name(model)
    out = None
    with timed() as prefill:
        for start in range(0, prompt.shape[1], piece):
            out = model(
                input_ids=prompt[:, start : start + piece], use_cache=True, logits_to_keep=1, **{name: cache}
            )
    token = out.logits[:, -1:].argmax(-1)
    tokens = [int(token)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    return tokens, prefill.seconds


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run in this process. spec: ids_file, context, cache, protocol, new_tokens, prefill_chunk,
    threads, warmup, malloc. Returns the run's record (RSS in bytes, seconds, tokens)."""
    from transformers import DynamicCache

    torch.set_num_threads(spec["threads"])
    model, _ = load_model(spec.get("model_name", "smollm2-135m"))  # float32, CPU, eval mode
    prompt = torch.tensor(json.loads(Path(spec["ids_file"]).read_text())[: spec["context"]]).unsqueeze(0)
    if prompt.shape[1] != spec["context"]:
        raise ValueError(f"the token stream holds {prompt.shape[1]} tokens, fewer than {spec['context']}")
    record: dict[str, Any] = {k: spec[k] for k in ("context", "cache", "protocol", "malloc")}
    record["malloc_env"] = {k: os.environ.get(k) for k in MALLOCS["mmap"]}
    record["cold_rss_bytes"] = current_rss_bytes()
    if spec["warmup"]:
        # The weights are memory-mapped and paged in by the first forward call (~0.5 GB of file-backed RSS on
        # SmolLM2): a one-off cost of any first call, which would otherwise count as the cache's peak.
        with torch.no_grad():
            model(input_ids=prompt[:, :16], use_cache=False)
    compressed = spec["cache"] != "dynamic"
    cd = ChunkedDecomp(config=CompressionConfig.from_preset(spec["cache"])) if compressed else None
    with cd.applied(model) if cd is not None else contextlib.nullcontext():
        if spec["protocol"] == "chunked":
            # What the wrapped forward would build on its first call; the same object is then passed back.
            cache = cd.make_cache(model) if cd is not None else DynamicCache(config=model.config)
        else:
            # The compressed generate builds its own cache (cd.last_cache); DynamicCache is passed explicitly.
            cache = None if cd is not None else DynamicCache(config=model.config)
        gc.collect()
        record["malloc_trimmed"] = _malloc_trim()
        record["hwm_resettable"] = os.access("/proc/self/clear_refs", os.W_OK)
        record["baseline_rss_bytes"] = current_rss_bytes()
        record["baseline_rss_kb_by_kind"] = _rss_kinds()
        with timed() as run, MemoryTracker(device="cpu") as mt:
            if spec["protocol"] == "chunked":
                tokens, record["prefill_seconds"] = _chunked(
                    model, prompt, spec["new_tokens"], cache, spec["prefill_chunk"]
                )
            else:
                tokens = _generate(model, prompt, spec["new_tokens"], cache)
        record["seconds"] = run.seconds
        if cache is None:
            cache = cd.last_cache
        record["peak_rss_bytes"] = mt.peak_bytes
        record["end_rss_bytes"] = current_rss_bytes()
        record["end_rss_kb_by_kind"] = _rss_kinds()
        record["rss_samples"] = len(mt.samples)
        record["kv_bytes"] = cache_nbytes(cache)
        record["cache_seq_length"] = int(cache.get_seq_length())
        record["cache_type"] = type(cache).__name__
        record["kv_kept_bytes_per_token"] = _kept_bytes_per_token(cache)
        record["tokens"] = tokens
    record["peak_increase_mb"] = (record["peak_rss_bytes"] - record["baseline_rss_bytes"]) / _MB
    return record


def spawn(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run `worker` in a fresh Python process and return its record; its stderr is shown only if it fails."""
    out = folder / "run.json"
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(OMP_NUM_THREADS=str(spec["threads"]), **MALLOCS[spec["malloc"]])
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(spec),
        "--worker_output",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(
            f"worker {spec['cache']} {spec['protocol']} @ {spec['context']} (malloc {spec['malloc']}) failed:\n{tail}"
        )
    return json.loads(out.read_text(encoding="utf-8"))


# ---- fits and tables ----------------------------------------------------------------------------------------
def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y ≈ a + b·x``; returns (a, b). Needs at least two distinct x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a linear fit needs at least two distinct contexts")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def longest_context(a: float, b: float, budget: float) -> int | None:
    """Largest context with a + b·context <= budget; None when the fitted slope is not positive (no bound)."""
    if b <= 0:
        return None
    return max(int((budget - a) / b), 0)


def _key(r: dict[str, Any]) -> tuple:
    return (r["malloc"], r["protocol"], r["context"], r["cache"])


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Medians per (malloc, protocol, context, cache), with ratios compressed ÷ dynamic."""
    rows = []
    for malloc in args.mallocs:
        for protocol in args.protocols:
            for ctx in args.contexts:
                base = None
                for cache in args.caches:
                    rs = [r for r in runs if _key(r) == (malloc, protocol, ctx, cache)]
                    row = {
                        "malloc": malloc,
                        "protocol": protocol,
                        "context": ctx,
                        "cache": cache,
                        "repeats": len(rs),
                        "baseline_rss_mb": statistics.median(r["baseline_rss_bytes"] for r in rs) / _MB,
                        "peak_rss_mb": statistics.median(r["peak_rss_bytes"] for r in rs) / _MB,
                        "peak_increase_mb": statistics.median(r["peak_increase_mb"] for r in rs),
                        "peak_increase_mb_all": [r["peak_increase_mb"] for r in rs],
                        "kv_bytes": int(statistics.median(r["kv_bytes"] for r in rs)),
                        "seconds": statistics.median(r["seconds"] for r in rs),
                        "cache_seq_length": rs[-1]["cache_seq_length"],
                        "kv_kept_bytes_per_token": rs[-1]["kv_kept_bytes_per_token"],
                    }
                    if cache == "dynamic":
                        base = row
                    row["peak_increase_ratio"] = row["peak_increase_mb"] / base["peak_increase_mb"]
                    row["kv_ratio"] = row["kv_bytes"] / base["kv_bytes"]
                    rows.append(row)
    return rows


def tokens_agree(runs: list[dict[str, Any]]) -> dict[str, bool]:
    """Per ``protocol/context/cache`` run more than once: whether every run (allocators, rounds) gave the same
    greedy tokens. Across protocols a compressed cache may differ: chunked prefill attends to chunks already
    compressed, generate's one-pass prefill to exact keys."""
    seen: dict[str, list[list[int]]] = {}
    for r in runs:
        seen.setdefault(f"{r['protocol']}/{r['context']}/{r['cache']}", []).append(r["tokens"])
    return {k: all(t == v[0] for t in v) for k, v in seen.items() if len(v) > 1}


def print_runs(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for malloc in args.mallocs:
        for protocol in args.protocols:
            how = (
                f"prompt in pieces of {args.prefill_chunk} tokens, then {args.new_tokens} greedy tokens one call each"
                if protocol == "chunked"
                else f"model.generate, {args.new_tokens} new tokens, greedy"
            )
            print(
                f"\n[{PROTOCOLS[protocol]} | malloc {malloc}] {how}; medians of {args.repeats} run(s), "
                "one process each; MB = 2^20 B"
            )
            print(
                f"{'context':>7} {'cache':<10} {'baseline MB':>11} {'peak MB':>8} {'peak incr MB':>12} "
                f"{'KV MiB':>8} {'incr ÷ dyn':>10} {'KV ÷ dyn':>8} {'seconds':>8}"
            )
            for r in rows:
                if (r["malloc"], r["protocol"]) == (malloc, protocol):
                    print(
                        f"{r['context']:>7} {r['cache']:<10} {r['baseline_rss_mb']:>11.1f} {r['peak_rss_mb']:>8.1f} "
                        f"{r['peak_increase_mb']:>12.1f} {r['kv_bytes'] / _MB:>8.1f} "
                        f"{r['peak_increase_ratio']:>10.3f} {r['kv_ratio']:>8.3f} {r['seconds']:>8.1f}"
                    )


def budget_fits(rows: list[dict[str, Any]], args: argparse.Namespace, budget: float) -> list[dict[str, Any]]:
    """Per allocator, protocol and cache: the line peak increase ≈ a + b·context, the slope of the exact KV bytes,
    and the longest context the budget allows by the first line."""
    fits = []
    for malloc in args.mallocs:
        for protocol in args.protocols:
            for cache in args.caches:
                rs = sorted(
                    (
                        r
                        for r in rows
                        if (r["malloc"], r["protocol"], r["cache"]) == (malloc, protocol, cache)
                    ),
                    key=lambda r: r["context"],
                )
                xs = [r["context"] for r in rs]
                a, b = linear_fit(xs, [r["peak_increase_mb"] for r in rs])
                _, kv_b = linear_fit(xs, [r["kv_bytes"] for r in rs])
                fits.append(
                    {
                        "malloc": malloc,
                        "protocol": protocol,
                        "cache": cache,
                        "contexts": xs,
                        "intercept_mb": a,
                        "fitted_peak_bytes_per_token": b * _MB,
                        "kv_bytes_per_token_fitted": kv_b,
                        "kv_kept_bytes_per_token": rs[-1]["kv_kept_bytes_per_token"],
                        "longest_context": longest_context(a, b, budget),
                    }
                )
    return fits


def print_fits(fits: list[dict[str, Any]], budget: float, budget_source: str) -> None:
    contexts = fits[0]["contexts"]
    print(
        f"\nLongest context within a peak-increase budget of {budget:.1f} MB ({budget_source}).\n"
        f"EXTRAPOLATION from a least-squares line peak increase ≈ a + b·context through contexts {contexts}, "
        "not a measurement.\nKV B/token: slope of the exact KV bytes over the same contexts; kept B/token: bytes "
        "per token of the sinks and compressed chunks (all tokens of DynamicCache) at the largest context."
    )
    print(
        f"{'malloc':<8} {'protocol':<16} {'cache':<10} {'a (MB)':>8} {'b peak B/token':>14} {'KV B/token':>10} "
        f"{'kept B/token':>12} {'longest context':>15}"
    )
    for f in fits:
        longest = "no bound" if f["longest_context"] is None else f"{f['longest_context']:,}"
        print(
            f"{f['malloc']:<8} {PROTOCOLS[f['protocol']]:<16} {f['cache']:<10} {f['intercept_mb']:>8.1f} "
            f"{f['fitted_peak_bytes_per_token']:>14.0f} {f['kv_bytes_per_token_fitted']:>10.0f} "
            f"{f['kv_kept_bytes_per_token']:>12.0f} {longest:>15}"
        )


# ---- command line -------------------------------------------------------------------------------------------
def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """What is measured: contexts, caches, protocols, malloc settings and the runs' sizes."""
    presets = list(load_presets())
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[4096, 8192], help="prompt lengths (tokens)"
    )
    parser.add_argument(
        "--caches", nargs="+", default=["dynamic", "balanced", "aggressive"], choices=["dynamic", *presets],
        help="'dynamic' (DynamicCache, the baseline, always run first) and compression presets",
    )  # fmt: skip
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=list(PROTOCOLS),
        choices=list(PROTOCOLS),
        help="see the module docstring",
    )
    parser.add_argument(
        "--mallocs", nargs="+", default=list(MALLOCS), choices=list(MALLOCS),
        help="glibc malloc setting of the runs: 'default' (as it comes) and 'mmap' (MALLOC_MMAP_THRESHOLD_=131072: "
        "freed blocks of 128 KiB or more go back to the system, so the RSS follows live bytes)",
    )  # fmt: skip
    parser.add_argument("--new_tokens", type=int, default=16, help="tokens generated after the prompt")
    parser.add_argument(
        "--prefill_chunk", type=int, default=512, help="tokens per forward call, chunked protocol"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every run (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument(
        "--offset", type=int, default=5000, help="first token of the prompts in the Wikipedia stream"
    )


def _add_estimate_options(parser: argparse.ArgumentParser) -> None:
    """The budget estimate and its check, the warm-up, the output, and the hidden worker flags."""
    parser.add_argument(
        "--budget_mb", type=float, default=None,
        help="peak-increase budget (MB) for the longest-context estimate (default: DynamicCache's chunked-prefill "
        f"peak increase at {DEFAULT_BUDGET_CONTEXT} tokens, or the smallest context measured)",
    )  # fmt: skip
    parser.add_argument(
        "--verify", action="store_true",
        help="one real chunked-prefill run per compressed cache at its predicted longest context",
    )  # fmt: skip
    parser.add_argument(
        "--verify_max_context", type=int, default=16384,
        help="longest verification run; a longer prediction is checked at this length and flagged (default: "
        "%(default)s, twice SmolLM2's 8,192 positions)",
    )  # fmt: skip
    parser.add_argument(
        "--cold", action="store_true",
        help="no warm-up forward call before the baseline (the first call's paging-in of the weights then counts)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="contexts 1024 2048, 4 new tokens, 1 round")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/memory/memory_peak.json)"
    )
    add_model_options(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_output", default=None, help=argparse.SUPPRESS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_run_options(parser)
    _add_estimate_options(parser)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    if args.quick:
        args.contexts, args.new_tokens, args.repeats = [1024, 2048], 4, 1
    for flag in ("new_tokens", "prefill_chunk", "repeats", "threads", "verify_max_context"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.offset < 0:
        parser.error(f"--offset must be >= 0, got {args.offset}")
    if any(c < 16 for c in args.contexts):
        parser.error(f"--contexts must each be >= 16 tokens, got {args.contexts}")
    args.contexts = sorted(set(args.contexts))
    if len(args.contexts) < 2:
        parser.error(
            f"--contexts needs at least two distinct lengths for the budget fit, got {args.contexts}"
        )
    if "dynamic" not in args.caches:
        parser.error("--caches must include 'dynamic' (the baseline of the ratios and the default budget)")
    args.caches = ["dynamic", *dict.fromkeys(c for c in args.caches if c != "dynamic")]
    args.protocols = list(dict.fromkeys(args.protocols))
    args.mallocs = list(dict.fromkeys(args.mallocs))
    if args.budget_mb is not None and args.budget_mb <= 0:
        parser.error(f"--budget_mb must be > 0, got {args.budget_mb}")
    if args.verify and "chunked" not in args.protocols:
        parser.error("--verify checks the chunked protocol's estimate: include 'chunked' in --protocols")
    if args.verify and len(args.caches) < 2:
        parser.error("--verify needs a compressed cache in --caches")
    return args


def load_stream(args: argparse.Namespace) -> tuple[torch.Tensor, int]:
    """The Wikipedia token stream from ``--offset`` (at least the longest context) and the model's positions;
    the model is loaded only for them (each run loads its own)."""
    model, _, ids = load_model_and_text(
        args.model_name, args.dataset, min_tokens=args.offset + max(args.contexts)
    )
    max_positions = model.config.max_position_embeddings
    del model
    return ids[args.offset :].clone(), max_positions


def run_one(
    base: dict[str, Any], folder: Path, context: int, cache: str, protocol: str, malloc: str, label: str
):
    """One run in a fresh process (:func:`spawn`), its line printed."""
    spec = {**base, "context": context, "cache": cache, "protocol": protocol, "malloc": malloc}
    r = spawn(spec, folder)
    print(
        f"{label} malloc {malloc:<7} {PROTOCOLS[protocol]:<16} context {context:>6} {cache:<10}: "
        f"peak +{r['peak_increase_mb']:7.1f} MB (baseline {r['baseline_rss_bytes'] / _MB:.0f} MB), "
        f"KV {r['kv_bytes'] / _MB:6.1f} MiB, {r['seconds']:.1f} s",
        flush=True,
    )
    return r


def run_rounds(args: argparse.Namespace, base: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """Every (context, malloc, protocol, cache) run, ``--repeats`` rounds, the caches' order reversed every
    other round."""
    runs: list[dict[str, Any]] = []
    for rnd in range(args.repeats):
        order = args.caches if rnd % 2 == 0 else args.caches[::-1]
        for ctx in args.contexts:
            for malloc in args.mallocs:
                for protocol in args.protocols:
                    for cache in order:
                        r = run_one(base, folder, ctx, cache, protocol, malloc, f"round {rnd + 1}")
                        runs.append({**r, "round": rnd + 1})
    return runs


def choose_budget(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[float, str]:
    """The peak-increase budget of the estimate and where it comes from (``--budget_mb`` or the default)."""
    if args.budget_mb is not None:
        return args.budget_mb, "--budget_mb"
    ref = "chunked" if "chunked" in args.protocols else args.protocols[0]
    ctx = DEFAULT_BUDGET_CONTEXT if DEFAULT_BUDGET_CONTEXT in args.contexts else args.contexts[0]
    row = next(r for r in rows if _key(r) == (args.mallocs[0], ref, ctx, "dynamic"))
    return (
        row["peak_increase_mb"],
        f"default: DynamicCache's {PROTOCOLS[ref]} peak increase at {ctx} tokens, malloc {args.mallocs[0]}",
    )


def verify_fits(
    fits: list[dict[str, Any]],
    args: argparse.Namespace,
    base: dict[str, Any],
    folder: Path,
    stream_tokens: int,
    max_positions: int,
    budget: float,
) -> list[dict[str, Any]]:
    """One real chunked-prefill run per compressed cache at its predicted longest context, under the first
    allocator setting only (each run is minutes)."""
    verified = []
    for f in fits:
        if (f["malloc"], f["protocol"]) != (args.mallocs[0], "chunked") or f["cache"] == "dynamic":
            continue
        if f["longest_context"] is None or f["longest_context"] < 16:
            continue
        ctx = min(f["longest_context"], stream_tokens, args.verify_max_context)
        r = run_one(base, folder, ctx, f["cache"], "chunked", f["malloc"], "verify ")
        verified.append(
            {
                "cache": f["cache"],
                "malloc": f["malloc"],
                "predicted_context": f["longest_context"],
                "context": ctx,
                "capped": ctx < f["longest_context"],
                "beyond_model_positions": ctx > max_positions,
                "peak_increase_mb": r["peak_increase_mb"],
                "budget_mb": budget,
                "within_budget": r["peak_increase_mb"] <= budget,
                "run": r,
            }
        )
    return verified


def print_verified(verified: list[dict[str, Any]], budget: float, max_positions: int) -> None:
    print("\nVerification (one real chunked-prefill run at the predicted length):")
    for v in verified:
        notes = [
            n
            for n, on in (
                (f"capped below the prediction {v['predicted_context']:,}", v["capped"]),
                (f"beyond the model's {max_positions:,} positions", v["beyond_model_positions"]),
            )
            if on
        ]
        print(
            f"  malloc {v['malloc']:<7} {v['cache']:<10} context {v['context']:>6,}: peak increase "
            f"{v['peak_increase_mb']:.1f} MB vs budget {budget:.1f} MB -> "
            f"{'within' if v['within_budget'] else 'OVER'}" + (f" ({'; '.join(notes)})" if notes else "")
        )


def measure(args: argparse.Namespace, stream: torch.Tensor, max_positions: int) -> dict[str, Any]:
    """Every run, their medians, the budget fits and (``--verify``) their check: ``runs``, ``rows``,
    ``same_tokens``, ``budget``, ``budget_source``, ``fits``, ``verified``."""
    with tempfile.TemporaryDirectory(prefix="memory_peak-") as tmp:
        ids_file = Path(tmp) / "ids.json"
        atomic_write_json(ids_file, stream.tolist())
        base = {"ids_file": str(ids_file), "new_tokens": args.new_tokens, "prefill_chunk": args.prefill_chunk}
        base.update(threads=args.threads, warmup=not args.cold, model_name=args.model_name)
        runs = run_rounds(args, base, Path(tmp))
        rows = summarise(runs, args)
        same_tokens = tokens_agree(runs)
        budget, budget_source = choose_budget(rows, args)
        fits = budget_fits(rows, args, budget)
        verified = []
        if args.verify:
            verified = verify_fits(fits, args, base, Path(tmp), len(stream), max_positions, budget)
    return {
        "runs": runs,
        "rows": rows,
        "same_tokens": same_tokens,
        "budget": budget,
        "budget_source": budget_source,
        "fits": fits,
        "verified": verified,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        atomic_write_json(args.worker_output, worker(json.loads(args.worker)), indent=None)
        return
    output = (
        Path(args.output)
        if args.output
        else RESULTS / "memory" / f"memory_peak{'_quick' if args.quick else ''}.json"
    )
    t_start = time.perf_counter()
    library = library_info()
    stream, max_positions = load_stream(args)
    print(
        f"SmolLM2-135M float32 CPU, {args.threads} thread(s); contexts {args.contexts}; caches {args.caches}; "
        f"protocols {args.protocols}; {args.new_tokens} new tokens; {len(stream):,} prompt tokens available",
        flush=True,
    )
    m = measure(args, stream, max_positions)
    rows, fits, verified, same_tokens = m["rows"], m["fits"], m["verified"], m["same_tokens"]
    budget, budget_source = m["budget"], m["budget_source"]

    print_runs(rows, args)
    print_fits(fits, budget, budget_source)
    if verified:
        print_verified(verified, budget, max_positions)
    if same_tokens:
        print(
            "\nsame greedy tokens in every run of a protocol, context and cache (allocators, rounds): "
            + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in same_tokens.items())
        )
    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall / 60:.1f} min")
    summary = {
        "benchmark": "memory_peak",
        "model": "smollm2-135m",
        "dtype": "float32",
        "device": "cpu",
        "threads": args.threads,
        "contexts": args.contexts,
        "caches": args.caches,
        "protocols": args.protocols,
        "mallocs": {m: MALLOCS[m] for m in args.mallocs},
        "new_tokens": args.new_tokens,
        "prefill_chunk": args.prefill_chunk,
        "repeats": args.repeats,
        "offset": args.offset,
        "mb": "2**20 bytes",
        "budget_mb": budget,
        "budget_source": budget_source,
        "budget_method": "extrapolation: least-squares line peak increase = a + b*context through the measured contexts",
        "library": library,
        **run_metadata("torch", "machine"),
        "wall_seconds": wall,
        "rows": rows,
        "fits": fits,
        "verified": verified,
        "same_tokens": same_tokens,
        "raw": m["runs"],
    }
    write_results(output, summary, leave_out=("raw", "rows", "verified"))


if __name__ == "__main__":
    main()
