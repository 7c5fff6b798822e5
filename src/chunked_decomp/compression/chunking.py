"""Which of a layer's exact tokens are compressed now, and in chunks of which lengths.

The newest ``residual_length`` tokens stay exact (the window); older ones are compressed in chunks of
``chunk_size`` as they age out of it, or all at once on request (``final``: after a prefill, say).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunking:
    """chunk_size: tokens per chunk; residual_length: newest tokens kept exact; dynamic: longer chunks for long
    sequences and near-equal chunks instead of a short remainder (see ``CompressionConfig.dynamic_chunking``)."""

    chunk_size: int
    residual_length: int
    dynamic: bool = False

    def sizes(self, tail_length: int, seq_length: int, final: bool) -> list[int]:
        """Lengths of the chunks to compress now, oldest first, out of ``tail_length`` exact tokens (past the
        sinks) of a sequence of ``seq_length``; with ``final``, every one of them."""
        avail = tail_length - (0 if final else self.residual_length)
        c = self.chunk_size
        if avail <= 0 or (avail < c and not final):
            return []
        if not self.dynamic:
            n = avail // c
            sizes = [c] * n
            if final and avail - n * c > 0:
                # A remainder is its own chunk: joined to the last chunk it saved a factorisation but cost quality.
                sizes.append(avail - n * c)
            return sizes
        # Longer sequences get longer chunks (the basis cost is spread over more tokens), and a span is split
        # into near-equal chunks instead of leaving a short remainder.
        target = 2 * c if seq_length >= 32 * c else c
        n = max(1, round(avail / target)) if final else max(1, avail // target)
        span = (
            avail if final else min(avail, n * target + (avail - n * target if avail - n * target < c else 0))
        )
        base, extra = divmod(span, n)
        return [base + 1] * extra + [base] * (n - extra)
