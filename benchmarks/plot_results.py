"""Plots of the benchmark results the docs show, drawn from the JSON files in ``benchmarks/results``.

Nothing is measured here: each figure reads what the benchmark scripts wrote, so it can be redrawn at any time
(and in CI) without a model. Figures (PNG, written atomically into the folder of the study they plot):

* ``peers/quality_per_byte.png`` — continuation and recall perplexity increase and passkey accuracy against
  stored bytes ÷ a 16-bit cache, for ChunkedDecomp's presets, the kvpress presses and transformers'
  `QuantizedCache` (``peers/compare_peers*.json``; the first window of each protocol, the same for every method);
* ``decode_speed/decode_speed.png`` — CPU decoding speed ÷ `DynamicCache` against context length, on 1 and 2
  threads, for ``fast`` and ``balanced`` (``decode_speed/{preset}_{4k,8k,batch4}_t{1,2}.json``);
* ``memory/memory_peak.png`` — peak process memory increase during generation ÷ `DynamicCache`
  (``memory/memory_peak.json``);
* ``gpu/gpu_attention.png`` — the Triton attention over the factors against SDPA on an H200
  (``gpu/gpu_attention.json``).

    python benchmarks/plot_results.py                 # all figures whose inputs exist
    python benchmarks/plot_results.py --only quality  # one of: quality, decode, memory, gpu

A figure whose input file is missing is skipped with a message; a malformed input raises an error naming it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chunked_decomp.benchmarking.plots import _figure, save_figure

RESULTS = Path(__file__).resolve().parent / "results"

# The comparison runs docs/results.md quotes, and the rows each one contributes (a method name, or a prefix ending
# in ":"). Every row is compared with the uncompressed run of its own file: each run measures its own baseline.
# The order sets the order (and colours) of the series: the presets, QuantizedCache, then the presses.
PEER_FILES: dict[str, tuple[str, ...]] = {
    "peers/compare_peers_balanced-transformers5.24.0.json": ("chunked:balanced@0.25",),
    "peers/compare_peers_long_context-transformers5.24.0.json": ("chunked:long_context@0.25",),
    "peers/compare_peers_fast-transformers5.24.0.json": ("chunked:fast@0.25",),
    "peers/compare_peers_aggressive_extreme-transformers5.24.0.json": (
        "chunked:aggressive@0.125",
        "chunked:extreme@0.0625",
    ),
    "peers/compare_peers-transformers5.24.0.json": ("quanto4", "quanto2"),
    "peers/compare_peers_kvpress_passkey1k-transformers5.2.0.json": ("kvpress:",),
    "peers/compare_peers_kvpress_0.0625-transformers5.2.0.json": ("kvpress:",),
}
# Rows of ChunkedDecomp plotted: the shipped presets at their budgets, with their labels.
PRESET_ROWS = {
    "chunked:balanced@0.25": "balanced",
    "chunked:long_context@0.25": "long_context",
    "chunked:fast@0.25": "fast",
    "chunked:aggressive@0.125": "aggressive",
    "chunked:extreme@0.0625": "extreme",
}


def _selected(method: str, selectors: tuple[str, ...]) -> bool:
    return any(method == s or (s.endswith(":") and method.startswith(s)) for s in selectors)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    if not path.exists():
        print(f"skipped: {path} does not exist")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _row_of_axes(ncols: int, size: tuple[float, float]):
    """A figure with one row of ``ncols`` axes (the library's figure helper)."""
    fig, axes = _figure(1, ncols, size)
    return fig, axes[0]


# Passkey lengths of the full protocol (1k and 2k tokens × 5 depths); rows of a shorter passkey run (the kvpress
# presses at 0.5-0.125 were run at 1k × 3 depths only) are left out of the passkey panel.
PASSKEY_LENGTHS = {"1024", "2048"}


def peer_points() -> dict[str, list[tuple[float, float, float | None, float | None, str]]]:
    """``{series: [(rho, continuation %, recall %, passkey, method), ...]}`` sorted by rho, from ``PEER_FILES``."""
    rows: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for name, selectors in PEER_FILES.items():
        data = _load(name)
        if data is None:
            continue
        base = next((row for row in data["rows"] if row["method"] == "full"), None)
        if base is None:
            continue
        for row in data["rows"]:
            if row is not base and _selected(row["method"], selectors):
                rows.setdefault(row["method"], (row, base))
    series: dict[str, list] = {}
    for method, (row, base) in rows.items():
        if method.startswith("chunked:"):
            if method not in PRESET_ROWS:
                continue
            label = "ChunkedDecomp presets"
        elif method.startswith("kvpress:"):
            label = "kvpress " + method.split(":")[1].split("@")[0]
        elif method.startswith("quanto"):
            label = "QuantizedCache (quanto 4/2-bit)"
        else:
            continue
        cont = 100 * (row["continuation_ppl"] / base["continuation_ppl"] - 1)
        recall, base_recall = row.get("recall_ppl"), base.get("recall_ppl")
        recall = None if recall is None or base_recall is None else 100 * (recall / base_recall - 1)
        passkey = row.get("passkey_acc")
        if set(row.get("passkey_by_length", {})) != PASSKEY_LENGTHS:
            passkey = None
        series.setdefault(label, []).append((row["rho"], cont, recall, passkey, method))
    return {k: sorted(v) for k, v in series.items()}


def plot_quality(out: Path) -> Path | None:
    series = peer_points()
    if not series:
        return None
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    fig, axes = _row_of_axes(3, (16, 5))
    titles = ["continuation perplexity increase (%)", "recall perplexity increase (%)", "passkey accuracy"]
    for s, (label, pts) in enumerate(series.items()):
        ours = label.startswith("ChunkedDecomp")
        style = dict(color="black" if ours else f"C{s % 10}", marker="o" if ours else "os^Dvx"[s % 6],
                     lw=2.2 if ours else 1.0, ms=7 if ours else 5, zorder=3 if ours else 2)  # fmt: skip
        for col, ax in enumerate(axes):
            xy = [(p[0], p[1 + col]) for p in pts if p[1 + col] is not None]
            if not xy:
                continue
            if ours:  # presets, not one method at several budgets: points with their names
                ax.plot(*zip(*xy), label=label, ls="none", **style)
                # Presets on the same point (passkey 1.0) share one label instead of overprinting each other.
                names: dict[tuple[float, float], list[str]] = {}
                for p in pts:
                    if p[1 + col] is not None:
                        names.setdefault((round(p[0], 3), round(p[1 + col], 3)), []).append(PRESET_ROWS[p[4]])
                for (x, y), group in names.items():
                    below = group == ["long_context"]
                    ax.annotate(" = ".join(group), (x, y), textcoords="offset points",
                                xytext=(6, -10 if below else 4), fontsize=7)  # fmt: skip
            else:
                ax.plot(*zip(*xy), label=label, **style)
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator([0.0625, 0.125, 0.25, 0.5]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("ρ: stored bytes ÷ 16-bit cache")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_yscale("symlog", linthresh=1.0)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.axhline(0, color="grey", lw=0.8)
    axes[0].axhline(0.5, color="green", lw=0.8, ls=":")
    axes[1].axhline(10, color="green", lw=0.8, ls=":")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].legend(fontsize=7, loc="center right")
    fig.suptitle(
        "SmolLM2-135M, Wikipedia, first window of each protocol: quality per byte (lower is better, passkey higher; "
        "dotted: the targets at 0.25)"
    )
    return save_figure(fig, out / "quality_per_byte.png")


def _context_axis(ax, contexts: list[int]) -> None:
    """A log2 x axis of context lengths, ticked at the measured ones."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c:,}" for c in contexts])
    ax.set_xlabel("context tokens")


# The decoding runs docs/results.md's table quotes: each preset, context and thread count run alone, 3 rounds
# (decode_speed.py --output benchmarks/results/decode_speed/{preset}_{run}_t{1,2}.json): (preset, mode) → label, runs.
DECODE_RUNS = {
    ("fast", "factored_post_rope"): ("fast (keys after RoPE, factored)", ("4k", "8k", "batch4")),
    ("balanced", "factored"): ("balanced, factored (pre-RoPE keys rebuilt)", ("4k", "8k")),
    ("balanced", "rebuild"): ("balanced, rebuild (the default decoding)", ("4k", "8k")),
}


def decode_points() -> dict[str, list[tuple[int, int, float]]]:
    """Series name → (context, batch, decode tokens/s ÷ `DynamicCache`) from the runs of `DECODE_RUNS`."""
    series: dict[str, list[tuple[int, int, float]]] = {}
    for (preset, mode), (label, runs) in DECODE_RUNS.items():
        for threads in (1, 2):
            pts = []
            for run in runs:
                data = _load(f"decode_speed/{preset}_{run}_t{threads}.json")
                if data is not None:
                    pts += [(r["context"], data["batch"], r[f"{mode}_speed_ratio"]) for r in data["rows"]]
            if pts:
                series[f"{label}, {threads} thread{'s' * (threads > 1)}"] = pts
    return series


def plot_decode(out: Path) -> Path | None:
    series = decode_points()
    if not series:
        return None
    fig, axes = _row_of_axes(1, (10, 4.5))
    ax = axes[0]
    for i, (name, pts) in enumerate(series.items()):
        # A colour per preset and mode; solid and filled for 2 threads, dashed and hollow for 1.
        two = name.endswith("threads")
        color, style, face = f"C{i // 2}", "-" if two else "--", None if two else "none"
        line = sorted((c, r) for c, b, r in pts if b == 1)
        ax.plot(*zip(*line), marker="o", mfc=face, color=color, ls=style, label=name)
        wide = [(c, r) for c, b, r in pts if b > 1]
        if wide:
            ax.plot(*zip(*wide), marker="*", ms=13, mfc=face, ls="none", color=color,
                    label=f"{name.split(' (')[0]}, batch 4, {name.rsplit(', ', 1)[1]}")  # fmt: skip
    ax.axhline(1, color="grey", lw=1, ls=":", label="DynamicCache")
    _context_axis(ax, sorted({c for pts in series.values() for c, _, _ in pts}))
    ax.set_ylabel("decode tokens/s ÷ DynamicCache")
    ax.set_title(
        "CPU decoding, SmolLM2-135M float32, 2-core machine (medians of 8 steps x 3 rounds)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, out / "decode_speed.png")


def plot_memory(out: Path) -> Path | None:
    data = _load("memory/memory_peak.json")
    if data is None:
        return None
    fig, axes = _row_of_axes(1, (7, 4.5))
    ax = axes[0]
    rows = [r for r in data["rows"] if r["cache"] != "dynamic"]
    groups = sorted({(r["malloc"], r["protocol"], r["cache"]) for r in rows})
    for i, (malloc, protocol, cache) in enumerate(groups):
        pts = sorted((r["context"], r["peak_increase_ratio"]) for r in rows
                     if (r["malloc"], r["protocol"], r["cache"]) == (malloc, protocol, cache))  # fmt: skip
        ax.plot(*zip(*pts), marker="os^D"[i % 4], color=f"C{i % 10}", ls="-" if malloc == "default" else "--",
                label=f"{cache}, {protocol}, {malloc} malloc")  # fmt: skip
    ax.axhline(1, color="grey", lw=1, ls="--")
    _context_axis(ax, sorted({r["context"] for r in rows}))
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("peak RSS increase ÷ DynamicCache")
    ax.set_title("Peak process memory while generating (CPU)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "memory_peak.png")


def plot_gpu(out: Path) -> Path | None:
    data = _load("gpu/gpu_attention.json")
    if data is None:
        return None
    rows = data["attention"]
    cells = sorted({(r["context"], r["budget"]) for r in rows})
    fig, axes = _row_of_axes(1, (8, 4.5))
    ax = axes[0]
    width = 0.27
    for i, (label, pick) in enumerate(
        [
            ("SDPA, full bf16 cache", None),
            ("ours, pre-RoPE keys", "pre-RoPE"),
            ("ours, post-RoPE keys", "post-RoPE"),
        ]
    ):
        ys = []
        for ctx, budget in cells:
            match = [r for r in rows if (r["context"], r["budget"]) == (ctx, budget)]
            if pick is None:
                ys.append(match[0]["sdpa_ms"])
            else:
                ys.append(next((r["ours_ms"] for r in match if r["keys"] == pick), math.nan))
        ax.bar([j + (i - 1) * width for j in range(len(cells))], ys, width, label=label, color=f"C{i}")
    ax.set_xticks(range(len(cells)), [f"{c // 1024}k tokens, ρ {b:g}" for c, b in cells])
    ax.set_ylabel("ms per decode step, one layer (median)")
    ax.set_title("H200, Llama-3.1-8B layer shapes, batch 4 (lower is better)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "gpu_attention.png")


FIGURES: dict[str, Callable[[Path], Path | None]] = {
    "quality": plot_quality,
    "decode": plot_decode,
    "memory": plot_memory,
    "gpu": plot_gpu,
}
# The study folder each figure is written to, next to the results it plots.
FOLDERS = {"quality": "peers", "decode": "decode_speed", "memory": "memory", "gpu": "gpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(FIGURES), nargs="+", help="figures to draw (default: all)")
    parser.add_argument(
        "--output_dir",
        default=str(RESULTS),
        help="folder whose study folders get the PNG files (default: %(default)s)",
    )
    args = parser.parse_args()
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"--output_dir {str(out)!r} is a file, not a folder")
    for name in args.only or list(FIGURES):
        folder = out / FOLDERS[name]
        folder.mkdir(parents=True, exist_ok=True)
        path = FIGURES[name](folder)
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
