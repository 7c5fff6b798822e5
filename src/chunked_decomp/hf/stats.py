"""Bytes and tokens a compressed cache holds, per layer and in total, against an uncompressed cache."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerMemoryStats:
    """Bytes and tokens of one layer. ``aged`` = sinks + compressed chunks (what the budget governs);
    ``overhead_bytes``: what the layer holds besides them and its window (the tables of its packed factors),
    included in ``stored_bytes``."""

    layer_idx: int
    seq_length: int
    exact_tokens: int
    compressed_tokens: int
    stored_bytes: int
    aged_stored_bytes: int
    uncompressed_bytes: int
    aged_uncompressed_bytes: int
    reference_bytes: int
    aged_reference_bytes: int
    mean_key_rank: float = 0.0
    mean_value_rank: float = 0.0
    overhead_bytes: int = 0


@dataclass
class CacheMemoryStats:
    """Totals over layers; ratios are ``stored / uncompressed`` (cache dtype) and ``stored / reference``.
    ``shared_bytes``: tensors the cache holds once for all its layers (the rotary frequencies), counted in
    ``stored_bytes``."""

    per_layer: list[LayerMemoryStats] = field(default_factory=list)
    shared_bytes: int = 0

    def _sum(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.per_layer)

    @property
    def stored_bytes(self) -> int:
        """Every byte the cache holds."""
        return self._sum("stored_bytes") + self.shared_bytes

    @property
    def uncompressed_bytes(self) -> int:
        return self._sum("uncompressed_bytes")

    @property
    def reference_bytes(self) -> int:
        return self._sum("reference_bytes")

    @property
    def compressed_tokens(self) -> int:
        return max((s.compressed_tokens for s in self.per_layer), default=0)

    @property
    def exact_tokens(self) -> int:
        return max((s.exact_tokens for s in self.per_layer), default=0)

    @property
    def seq_length(self) -> int:
        return max((s.seq_length for s in self.per_layer), default=0)

    @property
    def ratio(self) -> float:
        """Everything stored ÷ an uncompressed cache of the model's dtype."""
        return self.stored_bytes / self.uncompressed_bytes if self.uncompressed_bytes else 1.0

    @property
    def reference_ratio(self) -> float:
        """Everything stored ÷ an uncompressed cache of the reference dtype."""
        return self.stored_bytes / self.reference_bytes if self.reference_bytes else 1.0

    @property
    def aged_ratio(self) -> float:
        """Sinks + compressed chunks ÷ their reference bytes: the quantity ``compression_ratio`` budgets."""
        ref = self._sum("aged_reference_bytes")
        return self._sum("aged_stored_bytes") / ref if ref else 1.0

    def to_dict(self) -> dict:
        return {
            "seq_length": self.seq_length,
            "stored_bytes": self.stored_bytes,
            "uncompressed_bytes": self.uncompressed_bytes,
            "reference_bytes": self.reference_bytes,
            "ratio": self.ratio,
            "reference_ratio": self.reference_ratio,
            "aged_ratio": self.aged_ratio,
            "compressed_tokens": self.compressed_tokens,
            "exact_tokens": self.exact_tokens,
            "shared_bytes": self.shared_bytes,
            "per_layer": [vars(s) for s in self.per_layer],
        }
