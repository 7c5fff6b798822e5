"""What the commands print at the end: aligned tables, byte sizes and the one-line summary of a setting."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["human_bytes", "summary_line", "table"]


def table(frame: Any, columns: dict[str, tuple[str, str]]) -> str:
    """``frame`` (a DataFrame) as an aligned text table: column → (header, format spec); missing values as '-'."""
    present = [c for c in columns if c in frame.columns]
    rows = [[columns[c][0] for c in present]]
    for _, r in frame.iterrows():
        cells = []
        for c in present:
            v = r[c]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("-")
            else:
                cells.append(format(v, columns[c][1]) if columns[c][1] else str(v))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(present))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KB, MB or GB (powers of 1024), three significant figures or so."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return (
                f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
            )
        n /= 1024
    return f"{n:.1f} GB"


def summary_line(row: dict[str, Any]) -> str:
    """E.g. 'KV cache: 23.6 MB → 5.9 MB (25.0% of a 16-bit cache), perplexity 15.76 → 15.85 (+0.6%)'."""
    text = (
        f"KV cache: {human_bytes(row['kv_bytes_reference'])} → {human_bytes(row['kv_bytes_compressed'])} "
        f"({100 * row['compression_ratio_achieved']:.1f}% of a 16-bit cache), perplexity "
        f"{row['perplexity_original']:.2f} → {row['perplexity_compressed']:.2f} ({row['perplexity_increase']:+.1f}%)"
    )
    if row.get("speed_improvement") is not None:
        text += f", decoding {row['speed_improvement']:.2f}× the uncompressed speed"
    if row.get("first_divergence") is not None and row.get("generation_tokens"):
        text += (
            f", greedy generations identical for the first {row['first_divergence']:.0f} of "
            f"{row['generation_tokens']} tokens"
        )
    return text
