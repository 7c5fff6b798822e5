"""Soak benchmark: thousands of decoding steps with the compressed cache, watching memory and speed.

On the default model (SmolLM2-135M, float32, CPU) with the ``balanced`` preset wired in by
``ChunkedDecomp.compress_model``, a short Wikipedia prompt is prefilled and then ``--tokens`` tokens are decoded
one forward call at a time (greedy, or seeded sampling with ``--sample``). After every step it records the
process RSS (``chunked_decomp.evaluation.memory.current_rss_bytes``), the bytes the cache stores
(``cache.memory_stats().stored_bytes``), the step's wall-clock latency and the CPU time the process spent on it;
every ``--gc_every`` steps, the number of Python objects the garbage collector tracks. The same loop then runs
with transformers' uncompressed ``DynamicCache`` as the baseline, and a seeded-repeat check generates
``--repeat_tokens`` tokens twice with ``do_sample=True`` and the same seed (then once with another seed) through
``model.generate`` on the compressed model, after a ``--repeat_prompt_tokens`` prompt long enough that chunks are
compressed. Each of the three runs is a fresh Python process (this script with ``--worker``), so one run's
freed memory does not hide the next one's growth.

What it reports:

* leak: RSS growth minus the cache's own growth over the run, its value right after each chunk compression
  (the same phase of the cache's cycle) and the slope of those values per 1,000 tokens, next to the same numbers
  for ``DynamicCache``. Compressed decoding rebuilds every chunk of a layer at each step
  (``ChunkedSVDLayer.update`` returns full-length keys and values), so a transient working set of one layer's
  rebuilt keys and values grows with the context — a small, expected growth, not a leak;
* speed: tokens/s over the first and the last 10 % of the steps (wall clock and CPU time: on a shared machine
  the wall clock also measures the neighbours), and a least-squares fit of step time against context length.
  Both caches slow down as the context grows (attention reads every cached token); the compressed one faster,
  because each step also rebuilds every chunk;
* determinism: whether the two seeded runs gave identical tokens.

    python benchmarks/soak.py                    # 8,192 tokens: hours on a 2-core CPU (see docs/reliability.md)
    python benchmarks/soak.py --tokens 2048      # what fits in ~40 minutes on a busy 2-core CPU
    python benchmarks/soak.py --quick            # 1,024 tokens, a smoke test (writes soak_quick.{json,png})

Prints a table; writes ``benchmarks/results/soak/soak.json`` and ``soak.png`` atomically (the last line of stdout is
the JSON summary).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, add_model_options, load_model, run_metadata, text_token_ids, timed

from chunked_decomp import ChunkedDecomp
from chunked_decomp.evaluation.memory import cache_nbytes, current_rss_bytes
from chunked_decomp.hf.models import cache_kwarg_name, output_cache
from chunked_decomp.io import atomic_write_json

_MB = 1024 * 1024


def _picker(sample_seed: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The next token (batch, 1) from logits (batch, n, vocab): greedy, or sampled from the softmax with a
    generator seeded ``sample_seed``."""
    gen = torch.Generator().manual_seed(sample_seed) if sample_seed is not None else None

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if gen is None:
            return logits[:, -1:].argmax(-1)
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        return torch.multinomial(probs, 1, generator=gen)

    return pick


def _decode_step(
    model, token: torch.Tensor, cache: Any, name: str, pick: Callable, trace: dict
) -> torch.Tensor:
    """One single-token forward call on ``cache``, its latency, CPU time, RSS, cache bytes and context recorded
    in ``trace``; returns the next token."""
    with timed() as step:
        out = model(token, **{name: cache}, use_cache=True)
        token = pick(out.logits)
        trace["tokens"].append(int(token.item()))  # .item() also waits for the step to finish
    trace["latency_s"].append(step.seconds)
    trace["cpu_s"].append(step.cpu_seconds)
    del out
    trace["rss_bytes"].append(current_rss_bytes())
    trace["cache_bytes"].append(cache_nbytes(cache))
    trace["context"].append(cache.get_seq_length())
    return token


def decode_loop(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    steps: int,
    *,
    sample_seed: int | None = None,
    gc_every: int = 256,
    label: str = "",
) -> dict[str, Any]:
    """Prefill ``prompt`` (1, P) then run ``steps`` single-token forward calls with the model's cache.

    The model's own wiring decides the cache: a ``ChunkedSVDCache`` when ``compress_model`` was applied, else
    transformers' ``DynamicCache``. Greedy unless ``sample_seed`` is given (then multinomial sampling from the
    softmax with a generator of that seed).

    Returns per-step lists — ``context`` (tokens in the cache after the step), ``latency_s``, ``rss_bytes``,
    ``cache_bytes`` — plus ``gc_objects`` as ``(step, count)`` pairs, the generated ``tokens``, the cache's type
    name and the RSS and cache bytes right after the prefill (``rss0``, ``cache0``).
    """
    name = cache_kwarg_name(model)
    pick = _picker(sample_seed)
    trace: dict[str, list] = {
        k: [] for k in ("context", "latency_s", "cpu_s", "rss_bytes", "cache_bytes", "tokens")
    }
    gc_objects: list[tuple[int, int]] = []
    with torch.no_grad():
        with timed() as prefill:
            out = model(prompt, use_cache=True)
            cache = output_cache(out)
            token = pick(out.logits)
        del out
        gc.collect()
        rss0, cache0 = current_rss_bytes(), cache_nbytes(cache)
        gc_objects.append((0, len(gc.get_objects())))
        report_every = max(steps // 10, 1)
        for step in range(1, steps + 1):
            token = _decode_step(model, token, cache, name, pick, trace)
            if step % gc_every == 0 or step == steps:
                gc_objects.append((step, len(gc.get_objects())))
            if step % report_every == 0:
                recent = trace["latency_s"][-report_every:]
                print(
                    f"  {label} step {step}/{steps}: context {trace['context'][-1]}, "
                    f"{len(recent) / sum(recent):.2f} tok/s, RSS +{(trace['rss_bytes'][-1] - rss0) / _MB:.1f} MB, "
                    f"cache +{(trace['cache_bytes'][-1] - cache0) / _MB:.1f} MB",
                    flush=True,
                )
    return {
        **trace,
        "cache_type": type(cache).__name__,
        "prefill_s": prefill.seconds,
        "rss0": rss0,
        "cache0": cache0,
        "gc_objects": gc_objects,
    }


def _fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares ``y ≈ a + b x``: ``(a, b)``."""
    n = len(x)
    if n < 2:
        return (y[0] if y else 0.0), 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx if sxx else 0.0
    return my - b * mx, b


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Leak and speed figures of one `decode_loop` run (bytes, seconds, tokens/s)."""
    steps = len(run["latency_s"])
    rss_growth = run["rss_bytes"][-1] - run["rss0"]
    cache_growth = run["cache_bytes"][-1] - run["cache0"]
    extra = [(r - run["rss0"]) - (c - run["cache0"]) for r, c in zip(run["rss_bytes"], run["cache_bytes"])]
    half = steps // 2
    _, extra_slope = _fit_line(list(range(half, steps)), extra[half:])
    # Right after each compression (the cache's bytes drop): the same phase of its cycle every time.
    events = [i for i in range(1, steps) if run["cache_bytes"][i] < run["cache_bytes"][i - 1]]
    _, event_slope = _fit_line([float(i) for i in events], [extra[i] for i in events])
    tenth = max(steps // 10, 1)
    first, last = run["latency_s"][:tenth], run["latency_s"][-tenth:]
    first_cpu, last_cpu = run["cpu_s"][:tenth], run["cpu_s"][-tenth:]
    context = [float(c) for c in run["context"]]
    a, b = _fit_line(context, run["latency_s"])
    a_cpu, b_cpu = _fit_line(context, run["cpu_s"])
    gc_counts = run["gc_objects"]
    return {
        "cache_type": run["cache_type"],
        "steps": steps,
        "context_start": run["context"][0] - 1,
        "context_end": run["context"][-1],
        "prefill_s": run["prefill_s"],
        "rss_start_mb": run["rss0"] / _MB,
        "rss_growth_mb": rss_growth / _MB,
        "rss_peak_growth_mb": (max(run["rss_bytes"]) - run["rss0"]) / _MB,
        "cache_growth_mb": cache_growth / _MB,
        "cache_bytes_per_token": cache_growth / steps,
        "rss_minus_cache_growth_mb": (rss_growth - cache_growth) / _MB,
        "rss_minus_cache_max_mb": max(extra) / _MB,
        "rss_minus_cache_slope_2nd_half_mb_per_1k_tokens": extra_slope * 1000 / _MB,
        "compressions": len(events),
        "rss_minus_cache_after_each_compression_mb": [extra[i] / _MB for i in events],
        "rss_minus_cache_after_compression_slope_mb_per_1k_tokens": event_slope * 1000 / _MB
        if events
        else None,
        "tokens_per_s_first_10pct": len(first) / sum(first),
        "tokens_per_s_last_10pct": len(last) / sum(last),
        "tokens_per_s_overall": steps / sum(run["latency_s"]),
        "cpu_tokens_per_s_first_10pct": len(first_cpu) / sum(first_cpu),
        "cpu_tokens_per_s_last_10pct": len(last_cpu) / sum(last_cpu),
        "step_ms_fit_intercept": 1000 * a,
        "step_ms_fit_per_1k_context": 1000 * b * 1000,
        "cpu_step_ms_fit_intercept": 1000 * a_cpu,
        "cpu_step_ms_fit_per_1k_context": 1000 * b_cpu * 1000,
        "gc_objects_start": gc_counts[0][1],
        "gc_objects_end": gc_counts[-1][1],
        "gc_objects_per_1k_tokens": 1000 * (gc_counts[-1][1] - gc_counts[0][1]) / steps,
        "wall_s": sum(run["latency_s"]),
        "cpu_s": sum(run["cpu_s"]),
        "load_average_start": run["load_average"][0],
        "load_average_end": run["load_average"][1],
    }


def seeded_repeat(model, prompt: torch.Tensor, new_tokens: int, seed: int) -> dict[str, Any]:
    """Generate ``new_tokens`` with ``do_sample=True`` twice under ``seed`` and once under ``seed + 1``."""
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        top_k=50,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    runs = []
    for s in (seed, seed, seed + 1):
        torch.manual_seed(s)
        with torch.no_grad():
            runs.append(model.generate(prompt, **kwargs)[0, prompt.shape[1] :].tolist())
    return {
        "seed": seed,
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": new_tokens,
        "identical_with_same_seed": runs[0] == runs[1],
        "tokens_differing_with_other_seed": sum(a != b for a, b in zip(runs[0], runs[2])),
        "tokens": runs[0],
    }


@torch.no_grad()
def fixed_context_cycles(model, cd: ChunkedDecomp, prompt: torch.Tensor, cycles: int) -> dict[str, Any]:
    """Decode from the same context again and again: RSS at each cycle's start must stay flat if nothing leaks.

    The prompt (1, P) is prefilled once; each cycle then decodes ``chunk_size + residual_length`` tokens — at
    least one chunk is factored and quantised per cycle — and crops the cache back to P tokens. Every cycle
    starts from the same cache contents (from the second one on), so memory that keeps rising from cycle to cycle
    would be a leak, while memory that follows the context within a cycle is not.
    """
    name = cache_kwarg_name(model)
    out = model(prompt, use_cache=True)
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    del out
    base = cache.get_seq_length()
    steps = cd.config.chunk_size + cd.config.residual_length
    starts = []
    for cycle in range(cycles):
        gc.collect()
        starts.append(
            {
                "cycle": cycle,
                "rss_bytes": current_rss_bytes(),
                "cache_bytes": cache_nbytes(cache),
                "gc_objects": len(gc.get_objects()),
                "chunks_per_layer": len(cache.layers[0].chunks),
            }
        )
        peak = 0
        with timed() as cycle_time:
            before = cache.compression_seconds
            for _ in range(steps):
                out = model(token, **{name: cache}, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                del out
                peak = max(peak, current_rss_bytes())
        starts[-1].update(
            peak_rss_bytes=peak,
            seconds=cycle_time.seconds,
            compressed_this_cycle=cache.compression_seconds > before,
        )
        cache.crop(-(cache.get_seq_length() - base))
        print(
            f"  cycle {cycle + 1}/{cycles}: RSS at start {starts[-1]['rss_bytes'] / _MB:.1f} MB, "
            f"peak {peak / _MB:.1f} MB, {steps} steps in {starts[-1]['seconds']:.0f} s",
            flush=True,
        )
    rss = [s["rss_bytes"] for s in starts[1:]]  # from the second cycle on, every cycle starts alike
    _, slope = _fit_line([float(i) for i in range(len(rss))], [float(r) for r in rss])
    return {
        "context": base,
        "steps_per_cycle": steps,
        "cycles": starts,
        "rss_start_growth_mb": (starts[-1]["rss_bytes"] - starts[1]["rss_bytes"]) / _MB
        if cycles > 1
        else 0.0,
        "rss_start_slope_mb_per_cycle": slope / _MB,
        "gc_objects_growth": starts[-1]["gc_objects"] - starts[1]["gc_objects"] if cycles > 1 else 0,
        "every_cycle_compressed": all(s["compressed_this_cycle"] for s in starts),
    }


# ---- one run per process ------------------------------------------------------------------------------------


def _prompt(tokenizer, length: int, dataset: str = "wikipedia") -> torch.Tensor:
    ids = text_token_ids(tokenizer, dataset, num_samples=3, min_tokens=length)
    return ids[:length].unsqueeze(0)


def worker(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: ``"compressed"``, ``"uncompressed"`` (DynamicCache), ``"repeat"`` or ``"cycles"``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model_name)  # float32, CPU
    cd = ChunkedDecomp.from_preset(args.preset)
    if kind == "cycles":
        cd.compress_model(model)
        return fixed_context_cycles(
            model, cd, _prompt(tokenizer, args.cycle_context, args.dataset), args.cycles
        )
    if kind == "repeat":
        cd.compress_model(model)
        result = seeded_repeat(
            model, _prompt(tokenizer, args.repeat_prompt_tokens, args.dataset), args.repeat_tokens, args.seed
        )
        stats = cd.last_cache.memory_stats()
        result["compressed_tokens_in_cache"] = stats.compressed_tokens
        result["chunks_per_layer"] = len(cd.last_cache.layers[0].chunks)
        return result
    if kind == "compressed":
        cd.compress_model(model)
    steps = args.tokens if kind == "compressed" else args.baseline_tokens
    sample_seed = args.seed if args.sample else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    run = decode_loop(
        model, _prompt(tokenizer, args.prompt_tokens, args.dataset), steps, sample_seed=sample_seed, gc_every=args.gc_every,
        label=kind,
    )  # fmt: skip
    run["load_average"] = [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]
    if kind == "compressed":
        cache = cd.last_cache
        run["stored_ratio_16bit_at_end"] = cache.memory_stats().reference_ratio
        run["chunks_per_layer_at_end"] = len(cache.layers[0].chunks)
        n_chunks = sum(len(getattr(layer, "chunks", [])) for layer in cache.layers)
        run["gc_objects_per_chunk"] = (run["gc_objects"][-1][1] - run["gc_objects"][0][1]) / max(n_chunks, 1)
        config = model.config
        kv_bytes = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
        run["one_layer_rebuilt_kv_mb_at_end"] = kv_bytes * run["context"][-1] / _MB
    return run


def _spawn(kind: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Run `worker` in a fresh Python process; its stdout streams through, its result comes back as JSON."""
    out = folder / f"{kind}.json"
    flags = [
        "--worker", kind, "--worker_output", str(out), "--tokens", str(args.tokens),
        "--baseline_tokens", str(args.baseline_tokens), "--preset", args.preset,
        "--prompt_tokens", str(args.prompt_tokens), "--repeat_tokens", str(args.repeat_tokens),
        "--repeat_prompt_tokens", str(args.repeat_prompt_tokens), "--seed", str(args.seed),
        "--gc_every", str(args.gc_every), "--threads", str(args.threads), *(["--sample"] if args.sample else []),
        "--cycles", str(args.cycles), "--cycle_context", str(args.cycle_context),
        "--model_name", args.model_name, "--dataset", args.dataset,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *flags], check=True, env=env)
    return json.loads(out.read_text(encoding="utf-8"))


def _subsample(run: dict[str, Any], points: int = 1000) -> dict[str, list]:
    n = len(run["latency_s"])
    idx = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)}) if n > points else range(n)
    keys = ("context", "latency_s", "cpu_s", "rss_bytes", "cache_bytes")
    return {"step": [i + 1 for i in idx], **{k: [run[k][i] for i in idx] for k in keys}}


def _rolling_median(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = sorted(values[max(0, i - window + 1) : i + 1])
        out.append(part[len(part) // 2])
    return out


def _plot_run(mem: Any, lat: Any, cpu: Any, label: str, run: dict[str, Any]) -> None:
    """One run's lines: memory growth (RSS, cache bytes, their difference) and step wall and CPU times."""
    colors = {"rss": "tab:blue", "cache": "tab:orange", "diff": "tab:green"}
    steps = list(range(1, len(run["latency_s"]) + 1))
    rss = [(r - run["rss0"]) / _MB for r in run["rss_bytes"]]
    cache = [(c - run["cache0"]) / _MB for c in run["cache_bytes"]]
    diff = [r - c for r, c in zip(rss, cache)]
    ls = {"compressed": "-", "uncompressed": ":"}.get(label, "--")
    name = f"{label} ({run['cache_type']})"
    mem.plot(steps, rss, ls, color=colors["rss"], label=f"RSS − start, {name}")
    mem.plot(steps, cache, ls, color=colors["cache"], label=f"cache stored bytes − start, {name}")
    mem.plot(steps, diff, ls, color=colors["diff"], label=f"RSS growth − cache growth, {name}")
    window = max(len(steps) // 100, 1)
    for axis, key in ((lat, "latency_s"), (cpu, "cpu_s")):
        axis.plot(steps, [1000 * v for v in run[key]], ls, color="0.8", lw=0.5)
        axis.plot(
            steps,
            [1000 * v for v in _rolling_median(run[key], window)],
            ls,
            color="tab:red" if label == "compressed" else "tab:purple",
            label=f"{name}, rolling median of {window} steps",
        )


def _plot_cycles(cyc: Any, cycles: dict[str, Any]) -> None:
    """RSS at the start and peak of each fixed-context cycle, and the cache's bytes, from cycle 1's start."""
    rows = cycles["cycles"]
    first = rows[0]["rss_bytes"]
    x = [r["cycle"] + 1 for r in rows]
    cyc.plot(x, [(r["rss_bytes"] - first) / _MB for r in rows], "o-", label="RSS at the cycle's start")
    cyc.plot(x, [(r["peak_rss_bytes"] - first) / _MB for r in rows], "s--", label="RSS peak within the cycle")
    cyc.plot(x, [(r["cache_bytes"] - rows[0]["cache_bytes"]) / _MB for r in rows], "^:", label="cache bytes")
    cyc.set_xlabel(
        f"fixed-context cycle: decode {cycles['steps_per_cycle']} tokens from a {cycles['context']}-token "
        "context (compressing a chunk), then crop back"
    )
    cyc.set_xticks(x)
    cyc.set_ylabel("MB since cycle 1's start")
    cyc.axhline(0, color="black", lw=0.5)
    cyc.grid(alpha=0.3)
    cyc.legend(fontsize=8, loc="upper left")


def plot(
    runs: dict[str, dict[str, Any]], path: Path, title: str, cycles: dict[str, Any] | None = None
) -> Path:
    """Memory (RSS − start, cache bytes, their difference) and step latency against the decoding step; with
    ``cycles``, a last panel of RSS at the start and peak of each fixed-context cycle."""
    from matplotlib.figure import Figure

    from chunked_decomp.benchmarking.plots import save_figure

    fig = Figure(figsize=(11, 13 if cycles else 10), layout="constrained")
    if cycles:
        mem, lat, cpu, cyc = fig.subplots(4, 1, height_ratios=[3, 2, 2, 2])
        lat.sharex(mem)
        cpu.sharex(mem)
    else:
        mem, lat, cpu = fig.subplots(3, 1, sharex=True)
    for label, run in runs.items():
        _plot_run(mem, lat, cpu, label, run)
    mem.axhline(0, color="black", lw=0.5)
    mem.set_ylabel("MB since the end of the prefill")
    mem.set_title(title)
    mem.legend(fontsize=8, loc="upper left")
    lat.set_ylabel("step wall time (ms)")
    cpu.set_ylabel("step CPU time (ms)")
    cpu.set_xlabel("decoding step (one new token each); grey: every step")
    for axis in (mem, lat, cpu):
        axis.grid(alpha=0.3)
    for axis in (lat, cpu):
        axis.legend(fontsize=8, loc="upper left")
    if cycles:
        _plot_cycles(cyc, cycles)
    return save_figure(fig, path)


_ROWS = [
    ("steps", "steps", "d"),
    ("context_end", "context at end", "d"),
    ("rss_growth_mb", "RSS growth (MB)", ".1f"),
    ("cache_growth_mb", "cache growth (MB)", ".1f"),
    ("rss_minus_cache_growth_mb", "RSS − cache growth (MB)", ".1f"),
    ("rss_minus_cache_max_mb", "  max over the run (MB)", ".1f"),
    ("rss_minus_cache_slope_2nd_half_mb_per_1k_tokens", "  slope, 2nd half (MB/1k tok)", ".2f"),
    ("rss_minus_cache_after_compression_slope_mb_per_1k_tokens", "  slope after compressions", ".2f"),
    ("cache_bytes_per_token", "cache bytes per token", ".0f"),
    ("tokens_per_s_first_10pct", "tok/s, first 10%", ".2f"),
    ("tokens_per_s_last_10pct", "tok/s, last 10%", ".2f"),
    ("cpu_tokens_per_s_first_10pct", "CPU tok/s, first 10%", ".2f"),
    ("cpu_tokens_per_s_last_10pct", "CPU tok/s, last 10%", ".2f"),
    ("cpu_step_ms_fit_intercept", "CPU step ms at context 0", ".1f"),
    ("cpu_step_ms_fit_per_1k_context", "CPU step ms per 1k context", ".1f"),
    ("gc_objects_per_1k_tokens", "gc objects per 1k tokens", ".0f"),
    ("wall_s", "decode wall time (s)", ".0f"),
    ("load_average_start", "load average at start", ".1f"),
]


def table(summaries: dict[str, dict[str, Any]]) -> str:
    names = list(summaries)
    lines = [f"{'':32}" + "".join(f"{n:>16}" for n in names)]
    for key, label, fmt in _ROWS:
        cells = [summaries[n].get(key) for n in names]
        lines.append(
            f"{label:32}" + "".join(f"{format(c, fmt) if c is not None else '-':>16}" for c in cells)
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=None, help="decoding steps (default: 8192; --quick 1024)"
    )
    parser.add_argument("--quick", action="store_true", help="1,024 tokens, 64-token seeded repeat")
    parser.add_argument("--preset", default="balanced", help="compression preset (default: %(default)s)")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="Wikipedia prompt length of the soak")
    parser.add_argument(
        "--baseline_tokens",
        type=int,
        default=None,
        help="decoding steps of the DynamicCache baseline (default: --tokens; 0 skips it)",
    )
    parser.add_argument("--repeat_tokens", type=int, default=None, help="seeded-repeat length (default: 256)")
    parser.add_argument(
        "--repeat_prompt_tokens",
        type=int,
        default=512,
        help="prompt of the seeded repeat; long enough that the prefill compresses a chunk (default: %(default)s)",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=None,
        help="fixed-context cycles (decode chunk_size + residual_length tokens, crop back) (default: 8; --quick 3; "
        "0 skips them)",
    )
    parser.add_argument("--cycle_context", type=int, default=600, help="context the cycles return to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", action="store_true", help="seeded sampling in the soak instead of greedy")
    parser.add_argument("--gc_every", type=int, default=256, help="steps between gc object counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument(
        "--output", default=None, help="JSON path (default: benchmarks/results/soak/soak.json)"
    )
    parser.add_argument(
        "--worker", choices=["compressed", "uncompressed", "repeat", "cycles"], help=argparse.SUPPRESS
    )
    parser.add_argument("--worker_output", help=argparse.SUPPRESS)
    add_model_options(parser)
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 1024 if args.quick else 8192
    if args.repeat_tokens is None:
        args.repeat_tokens = 64 if args.quick else 256
    if args.baseline_tokens is None:
        args.baseline_tokens = args.tokens
    if args.cycles is None:
        args.cycles = 3 if args.quick else 8
    return args


def run_workers(
    args: argparse.Namespace,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """The runs, each in a fresh process: ``({"compressed": …, "uncompressed": …}, seeded repeat, cycles)``."""
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        print(f"compressed ({args.preset}): {args.tokens} decoding steps", flush=True)
        runs["compressed"] = _spawn("compressed", args, Path(tmp))
        print(f"seeded repeat: 3 × {args.repeat_tokens} sampled tokens, seed {args.seed}", flush=True)
        repeat = _spawn("repeat", args, Path(tmp))
        if args.baseline_tokens > 0:
            print(f"uncompressed DynamicCache: {args.baseline_tokens} decoding steps", flush=True)
            runs["uncompressed"] = _spawn("uncompressed", args, Path(tmp))
        cycles = None
        if args.cycles > 0:
            print(
                f"fixed-context cycles: {args.cycles} × decode and crop back to {args.cycle_context}",
                flush=True,
            )
            cycles = _spawn("cycles", args, Path(tmp))
    return runs, repeat, cycles


def summarize_runs(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`summarize` of each run; the compressed one also gets its cache's figures at the end and, with a
    baseline, how many tokens agree with it."""
    summaries = {label: summarize(run) for label, run in runs.items()}
    comp = summaries["compressed"]
    for key in ("stored_ratio_16bit_at_end", "chunks_per_layer_at_end", "gc_objects_per_chunk"):
        comp[key] = runs["compressed"][key]
    comp["one_layer_rebuilt_kv_mb_at_end"] = runs["compressed"]["one_layer_rebuilt_kv_mb_at_end"]
    if "uncompressed" in runs:
        pairs = list(zip(runs["compressed"]["tokens"], runs["uncompressed"]["tokens"]))
        comp["tokens_agreeing_with_uncompressed"] = sum(a == b for a, b in pairs)
        comp["tokens_identical_before_first_difference"] = next(
            (i for i, (a, b) in enumerate(pairs) if a != b), len(pairs)
        )
    return summaries


def print_report(
    summaries: dict[str, dict[str, Any]],
    repeat: dict[str, Any],
    cycles: dict[str, Any] | None,
    args: argparse.Namespace,
) -> None:
    print()
    print(table(summaries))
    print(
        f"\nseeded repeat ({repeat['prompt_tokens']}-token prompt + {args.repeat_tokens} tokens, do_sample=True, "
        f"seed {args.seed}, {repeat['chunks_per_layer']} chunks per layer): "
        f"{'identical' if repeat['identical_with_same_seed'] else 'DIFFERENT'} with the same seed; "
        f"{repeat['tokens_differing_with_other_seed']} of {args.repeat_tokens} tokens differ with seed {args.seed + 1}"
    )
    if cycles is not None:
        print(
            f"fixed-context cycles ({cycles['context']} tokens, +{cycles['steps_per_cycle']} and back, "
            f"{args.cycles} cycles): RSS at cycle start {cycles['rss_start_growth_mb']:+.1f} MB from cycle 2 to "
            f"{args.cycles} ({cycles['rss_start_slope_mb_per_cycle']:+.2f} MB per cycle), gc objects "
            f"{cycles['gc_objects_growth']:+d}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        atomic_write_json(args.worker_output, worker(args.worker, args), indent=None)
        return {}
    output = (
        Path(args.output)
        if args.output
        else RESULTS / "soak" / ("soak_quick.json" if args.quick else "soak.json")
    )
    if args.prompt_tokens + args.tokens > 8192:
        print(
            f"note: {args.prompt_tokens} + {args.tokens} tokens exceed SmolLM2-135M's 8,192-token context; "
            "the last positions are beyond its training length",
            flush=True,
        )
    t_start = time.perf_counter()
    runs, repeat, cycles = run_workers(args)
    summaries = summarize_runs(runs)
    title = (
        f"Soak: SmolLM2-135M float32 CPU, {args.prompt_tokens}-token prompt + {args.tokens} decoded tokens, "
        f"ChunkedDecomp '{args.preset}' vs DynamicCache"
    )
    png = plot(runs, output.with_suffix(".png"), title, cycles)
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "benchmark": "soak",
        "command": command.strip(),
        "model": "smollm2-135m",
        "dtype": "float32",
        "preset": args.preset,
        "prompt_tokens": args.prompt_tokens,
        "tokens": args.tokens,
        "baseline_tokens": args.baseline_tokens,
        "decoding": "seeded sampling" if args.sample else "greedy",
        "threads": args.threads,
        "machine": run_metadata("platform", "cpus", "torch"),
        "total_wall_s": time.perf_counter() - t_start,
        "summary": summaries,
        "seeded_repeat": repeat,
        "fixed_context_cycles": cycles,
        "plot": str(png.relative_to(RESULTS.parent.parent))
        if png.is_relative_to(RESULTS.parent.parent)
        else str(png),
        "traces": {label: _subsample(run) for label, run in runs.items()},
        "gc_objects": {label: run["gc_objects"] for label, run in runs.items()},
    }
    atomic_write_json(output, result, indent=None)
    print_report(summaries, repeat, cycles, args)
    print(f"wrote {output} and {png}")
    brief = {k: v for k, v in result.items() if k not in ("traces", "gc_objects")}
    brief["seeded_repeat"] = {k: v for k, v in repeat.items() if k != "tokens"}
    print(json.dumps(brief))
    return result


if __name__ == "__main__":
    main()
