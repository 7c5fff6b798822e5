"""PNG plots of compression, evaluation and scaling results (matplotlib, no pyplot state).

Figures are built as bare ``matplotlib.figure.Figure`` objects, which render with Agg without touching pyplot's
global backend, and are saved atomically (see :mod:`chunked_decomp.io`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from chunked_decomp.io import atomic_open

__all__ = [
    "plot_comparison",
    "plot_compression_summary",
    "plot_long_context",
    "plot_quality",
    "plot_ranks",
    "plot_scaling",
    "save_figure",
]

_MB = 1024 * 1024


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors() -> list[str]:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically."""
    path = Path(path)
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return path


def _ratio_label(method: str, ratio: float) -> str:
    return "uncompressed (16-bit)" if method == "full" else f"ChunkedDecomp ρ={ratio:g}"


def plot_scaling(frame: Any, path: str | Path) -> Path:
    """Four panels against context length, one colour per setting and one line style per batch size:
    stored KV cache (MB), perplexity increase (%), decode speed relative to the uncompressed cache in the same
    cell, and peak process memory (MB)."""
    fig, axes = _figure(2, 2, (12, 8.5))
    (ax_kv, ax_q), (ax_s, ax_m) = axes
    colors = _colors()
    styles = ["-", "--", ":", "-."]
    settings = sorted(
        {(m, r) for m, r in zip(frame["method"], frame["compression_ratio"])},
        key=lambda mr: (mr[0] != "full", -mr[1]),
    )
    batches = sorted(frame["batch_size"].unique())
    for i, (method, ratio) in enumerate(settings):
        for j, batch in enumerate(batches):
            sub = frame[
                (frame["method"] == method)
                & (frame["compression_ratio"] == ratio)
                & (frame["batch_size"] == batch)
            ]
            sub = sub.sort_values("seq_len")
            if sub.empty:
                continue
            label = _ratio_label(method, ratio) + (f", batch {batch}" if len(batches) > 1 else "")
            kw = dict(
                color=colors[i % len(colors)], ls=styles[j % len(styles)], marker="o", ms=4, label=label
            )
            ax_kv.plot(sub["seq_len"], sub["kv_bytes"] / _MB, **kw)
            ax_m.plot(sub["seq_len"], sub["peak_memory_mb"], **kw)
            if method != "full":
                ax_q.plot(sub["seq_len"], sub["perplexity_increase_pct"], **kw)
            ax_s.plot(sub["seq_len"], sub["speed_ratio"], **kw)
    ax_kv.set_title("KV cache stored for the context")
    ax_kv.set_ylabel("MB (uncompressed counted at 16 bits)")
    ax_q.set_title("Quality: continuation perplexity increase")
    ax_q.set_ylabel("% over uncompressed")
    ax_q.axhline(0, color="grey", lw=0.8)
    ax_s.set_title("Decoding speed relative to the uncompressed cache (same cell)")
    ax_s.set_ylabel("× (1 = as fast)")
    ax_s.axhline(1, color="grey", lw=0.8)
    ax_s.set_ylim(bottom=0)
    ax_m.set_title("Peak process memory during the cell")
    ax_m.set_ylabel("MB (RSS on CPU, CUDA allocated on GPU)")
    seq = sorted(frame["seq_len"].unique())
    for ax in (ax_kv, ax_q, ax_s, ax_m):
        ax.set_xlabel("context length (tokens)")
        ax.set_xticks(seq)
        ax.grid(alpha=0.3)
    ax_kv.set_ylim(bottom=0)
    ax_kv.legend(fontsize=8)
    return save_figure(fig, path)


def plot_compression_summary(frame: Any, path: str | Path) -> Path:
    """Two panels for ``compress`` results (one row per setting): KV cache MB of the 16-bit uncompressed cache
    vs what ChunkedDecomp stores, per setting; and perplexity increase against the achieved ratio ρ, one line
    per chunk size."""
    fig, axes = _figure(1, 2, (12, 4.8))
    ax_kv, ax_q = axes[0]
    labels = [f"ρ={r:g}\nchunk {c}" for r, c in zip(frame["compression_ratio"], frame["chunk_size"])]
    x = list(range(len(frame)))
    w = 0.38
    ref = (frame["kv_bytes_reference"] / _MB).tolist()
    stored = (frame["kv_bytes_compressed"] / _MB).tolist()
    ax_kv.bar([i - w / 2 for i in x], ref, w, label="uncompressed, 16-bit", color="#999999")
    bars = ax_kv.bar([i + w / 2 for i in x], stored, w, label="ChunkedDecomp stored", color=_colors()[0])
    for rect, rho in zip(bars, frame["compression_ratio_achieved"]):
        ax_kv.annotate(
            f"{100 * rho:.1f}%",
            (rect.get_x() + rect.get_width() / 2, rect.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax_kv.set_xticks(x, labels, fontsize=8)
    ax_kv.set_ylabel("KV cache of the context (MB)")
    ax_kv.set_title("KV cache memory per setting (label: % of the 16-bit cache)")
    ax_kv.set_ylim(0, max(ref) * 1.22)  # headroom for the legend above the bars
    ax_kv.legend(fontsize=8, loc="upper center", ncol=2)
    ax_kv.grid(axis="y", alpha=0.3)
    for i, (chunk, sub) in enumerate(frame.groupby("chunk_size")):
        sub = sub.sort_values("compression_ratio_achieved")
        ax_q.plot(
            sub["compression_ratio_achieved"],
            sub["perplexity_increase"],
            marker="o",
            color=_colors()[i % len(_colors())],
            label=f"chunk size {chunk}",
        )
        for x, y in zip(sub["compression_ratio_achieved"], sub["perplexity_increase"]):
            ax_q.annotate(f"{y:+.2f}%", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    # Budgets start at 0: a single setting still shows where it sits.
    ax_q.set_xlim(0, min(1.05, float(frame["compression_ratio_achieved"].max()) * 1.25 + 0.02))
    ax_q.axhline(0, color="grey", lw=0.8)
    ax_q.set_xlabel("achieved ratio ρ (stored ÷ 16-bit cache)")
    ax_q.set_ylabel("perplexity increase (%)")
    ax_q.set_title("Quality vs. compression (continuation protocol)")
    ax_q.grid(alpha=0.3)
    ax_q.legend(fontsize=8)
    return save_figure(fig, path)


def plot_ranks(per_setting: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Mean rank of the compressed chunks per layer (keys solid, values dashed), one colour per setting.

    per_setting: label → per-layer dicts with ``layer_idx``, ``mean_key_rank``, ``mean_value_rank``.
    """
    fig, axes = _figure(1, 1, (9, 4.5))
    ax = axes[0][0]
    colors = _colors()
    for i, (label, layers) in enumerate(per_setting.items()):
        idx = [layer["layer_idx"] for layer in layers]
        color = colors[i % len(colors)]
        ax.plot(
            idx,
            [layer["mean_key_rank"] for layer in layers],
            color=color,
            marker="o",
            ms=3,
            label=f"{label} keys",
        )
        ax.plot(
            idx,
            [layer["mean_value_rank"] for layer in layers],
            color=color,
            ls="--",
            marker="s",
            ms=3,
            label=f"{label} values",
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean rank of a compressed chunk")
    ax.set_title("Ranks chosen per layer (adaptive budget; keys solid, values dashed)")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_quality(frame: Any, path: str | Path) -> Path:
    """Two panels for ``evaluate`` results: perplexity increase against ρ, and generation fidelity against ρ
    (BLEU ÷ 100, ROUGE-L, semantic similarity and token agreement of the compressed model's greedy generations
    against the uncompressed model's)."""
    fig, axes = _figure(1, 2, (12, 4.8))
    ax_q, ax_t = axes[0]
    frame = frame.sort_values("compression_ratio_achieved")
    rho = frame["compression_ratio_achieved"]
    if "perplexity_increase" in frame.columns and frame["perplexity_increase"].notna().any():
        ax_q.plot(rho, frame["perplexity_increase"], marker="o", color=_colors()[0])
        for x, y, r in zip(rho, frame["perplexity_increase"], frame["compression_ratio"]):
            ax_q.annotate(f"target {r:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    else:
        ax_q.text(0.5, 0.5, "perplexity not measured", ha="center", va="center", transform=ax_q.transAxes)
    ax_q.axhline(0, color="grey", lw=0.8)
    ax_q.set_xlabel("achieved ratio ρ (stored ÷ 16-bit cache)")
    ax_q.set_ylabel("perplexity increase (%)")
    ax_q.set_title("Perplexity vs. compression")
    ax_q.grid(alpha=0.3)
    series = [
        ("bleu", "BLEU ÷ 100", 0.01),
        ("rouge_l", "ROUGE-L F1", 1.0),
        ("semantic_sim", "semantic similarity (MiniLM)", 1.0),
        ("token_agreement", "token agreement", 1.0),
    ]
    drawn = 0
    for i, (col, label, scale) in enumerate(series):
        if col in frame.columns and frame[col].notna().any():
            ax_t.plot(
                rho,
                frame[col] * scale,
                marker="osD^"[i],
                ms=8 - 1.5 * i,
                color=_colors()[(i + 1) % len(_colors())],
                label=label,
            )
            drawn += 1
    ax_t.set_xlabel("achieved ratio ρ (stored ÷ 16-bit cache)")
    ax_t.set_ylabel("score vs. uncompressed generations (1 = identical)")
    ax_t.set_ylim(-0.02, 1.05)
    ax_t.set_title("Generation fidelity vs. compression")
    ax_t.grid(alpha=0.3)
    if drawn:
        ax_t.legend(fontsize=8)
    else:
        ax_t.text(
            0.5, 0.5, "no generation metric measured", ha="center", va="center", transform=ax_t.transAxes
        )
    return save_figure(fig, path)


def plot_comparison(frame: Any, path: str | Path) -> Path:
    """Perplexity increase against stored bytes ρ for every method of a comparison study (one marker family
    per method kind); the y axis turns symmetric-log when some increase passes 50 %, so that sub-percent and
    collapsed methods stay readable together."""
    fig, axes = _figure(1, 1, (9, 5.5))
    ax = axes[0][0]
    colors = _colors()
    kinds: dict[str, int] = {}
    labels: dict[tuple[float, float], list[str]] = {}
    for _, row in frame.iterrows():
        name = str(row["method"])
        kind = name.split(":")[0].split("@")[0]
        first = kind not in kinds
        k = kinds.setdefault(kind, len(kinds))
        y = row["increase_pct"]
        if y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        ax.scatter(
            row["ratio"],
            y,
            color=colors[k % len(colors)],
            marker="os^Dvx"[k % 6],
            s=40,
            label=kind if first else None,
        )
        # Methods that land on the same point share one label instead of overprinting each other.
        key = (round(float(row["ratio"]), 4), round(float(y), 4))
        labels.setdefault(key, []).append(name)
    for (x, y), names in labels.items():
        ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.legend(fontsize=8)
    increases = [abs(v) for v in frame["increase_pct"] if v is not None and v == v]
    wide = bool(increases) and max(increases) > 50  # collapsing peers next to sub-percent ones
    if wide:
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("symlog", linthresh=1.0)
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("ρ: stored bytes ÷ uncompressed 16-bit cache")
    ax.set_ylabel("perplexity increase (%" + (", symmetric log scale)" if wide else ")"))
    ax.set_title("Methods at their stored bytes (continuation protocol)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_long_context(rows: list[dict[str, Any]], task: str, path: str | Path) -> Path:
    """Score against bytes held (ρ) for every method on ``task``, one panel per context length, from the rows of
    :func:`chunked_decomp.evaluation.longctx.summarize`; the dashed line is the uncompressed score."""
    rows = [r for r in rows if r["task"] == task]
    lengths = sorted({r["context_length"] for r in rows})
    fig, axes = _figure(1, max(1, len(lengths)), (5 * max(1, len(lengths)), 4.2))
    colors = _colors()
    kinds: dict[str, int] = {}
    for ax, length in zip(axes[0], lengths):
        cell = [r for r in rows if r["context_length"] == length]
        for r in cell:
            kind = str(r["method"]).split("@")[0]
            k = kinds.setdefault(kind, len(kinds))
            ax.scatter(r["ratio"], r["score"], color=colors[k % len(colors)], marker="os^Dvx"[k % 6], s=40)
            ax.annotate(
                str(r["method"]),
                (r["ratio"], r["score"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
            )
        reference = cell[0]["reference_score"] if cell else math.nan
        if reference == reference:
            ax.axhline(reference, color="grey", ls="--", lw=0.8)
        solved = bool(cell and cell[0]["solved_by_reference"])
        ax.set_title(
            f"{task}, {length} tokens" + ("" if solved else " (uncompressed < 0.5: not informative)"),
            fontsize=9,
        )
        ax.set_xlabel("ρ: bytes held ÷ uncompressed 16-bit cache")
        ax.set_ylabel("score (RULER string match)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
