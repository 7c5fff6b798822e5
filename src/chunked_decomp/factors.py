"""Storage of one compressed chunk: low-rank factors of its keys and values (no transformers import).

A chunk of ``T`` tokens of one layer holds, for keys and for values, one factor pair per *group*: each KV head
alone (``per_head``) or all heads joined (``joined``, one matrix of ``kv_heads * head_dim`` columns). A pair is
``token (batch, T, r)`` and ``channel (batch, r, n)`` with ``x ≈ token @ channel``; ``r`` may differ per group,
kind and chunk. Factors are plain tensors in ``factor_dtype`` or `QuantizedTensor` (token factor grouped along
tokens, per component; channel factor grouped along channels, per component), so stored bytes are exactly what
``nbytes`` counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chunked_decomp.quantization import QuantizedTensor, quantize, quantized_nbytes

Factor = torch.Tensor | QuantizedTensor | None


@dataclass
class FactorCodec:
    """How factors are stored: quantised (bits, group size) or cast to ``factor_dtype``."""

    quantize: bool
    token_bits: int
    channel_bits: int
    group_size: int
    factor_dtype: torch.dtype

    def encode(self, token: torch.Tensor, channel: torch.Tensor) -> tuple[Factor, Factor]:
        """token: (batch, T, r), channel: (batch, r, n) float32 → stored factors (None when r == 0)."""
        if token.shape[-1] == 0:
            return None, None
        if not self.quantize:
            # copy=True: a slice of the batched factorisation is often already contiguous, and keeping it as a
            # view would hold every chunk's full-rank factors alive.
            fmt = torch.contiguous_format
            return (
                token.to(self.factor_dtype, copy=True, memory_format=fmt),
                channel.to(self.factor_dtype, copy=True, memory_format=fmt),
            )
        return (
            quantize(token, self.token_bits, self.group_size, group_dim=-2, scale_dtype=self.factor_dtype),
            quantize(
                channel, self.channel_bits, self.group_size, group_dim=-1, scale_dtype=self.factor_dtype
            ),
        )

    def cost(self, batch: int, m: int, n: int) -> Callable[[int], int]:
        """bytes(r) stored for a (batch, m, n) matrix at rank r."""
        scale_bytes = torch.empty((), dtype=self.factor_dtype).element_size()

        def bytes_at(r: int) -> int:
            if r == 0:
                return 0
            if not self.quantize:
                return batch * (m * r + r * n) * scale_bytes
            return quantized_nbytes((batch, m, r), self.token_bits, self.group_size, -2, scale_bytes) + (
                quantized_nbytes((batch, r, n), self.channel_bits, self.group_size, -1, scale_bytes)
            )

        return bytes_at


def _decode(f: Factor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(f, QuantizedTensor):
        return f.dequantize().to(dtype)
    return f.to(dtype)


def _nbytes(f: Factor) -> int:
    if f is None:
        return 0
    if isinstance(f, QuantizedTensor):
        return f.nbytes
    return f.numel() * f.element_size()


def _map(f: Factor, fn_tensor: Callable, fn_q: Callable) -> Factor:
    if f is None:
        return None
    if isinstance(f, QuantizedTensor):
        return fn_q(f)
    return fn_tensor(f)


@dataclass
class FactorSet:
    """Factors of one kind (keys or values) of one chunk.

    pairs: one ``(token, channel)`` per group; token: (batch, T, r_g), channel: (batch, r_g, n_g).
    heads, head_dim: layout to rebuild ``(batch, heads, T, head_dim)``; ``joined`` when one group spans all heads.
    """

    pairs: list[tuple[Factor, Factor]]
    batch: int
    length: int
    heads: int
    head_dim: int
    joined: bool

    @property
    def ranks(self) -> list[int]:
        return [
            0 if t is None else (t.shape[-1] if isinstance(t, QuantizedTensor) else t.shape[-1])
            for t, _ in self.pairs
        ]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) + _nbytes(c) for t, c in self.pairs)

    def reconstruct(
        self, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> torch.Tensor:
        """(batch, heads, T, head_dim) in ``dtype``."""
        n = self.heads * self.head_dim if self.joined else self.head_dim
        outs = []
        for token, channel in self.pairs:
            if token is None:
                outs.append(torch.zeros(self.batch, self.length, n, dtype=dtype, device=device))
            else:
                outs.append(_decode(token, dtype) @ _decode(channel, dtype))
        if self.joined:
            x = outs[0].reshape(self.batch, self.length, self.heads, self.head_dim)
            return x.transpose(1, 2)
        return torch.stack(outs, dim=1)

    def crop(self, length: int) -> FactorSet:
        """Keep the first ``length`` tokens (token factors are sliced; channel factors are shared)."""

        def cut_t(t: torch.Tensor) -> torch.Tensor:
            return t[:, :length].clone()

        def cut_q(q: QuantizedTensor) -> QuantizedTensor:
            return q.slice_prefix(length)

        pairs = [(_map(t, cut_t, cut_q), c) for t, c in self.pairs]
        return FactorSet(pairs, self.batch, length, self.heads, self.head_dim, self.joined)

    def select_batch(self, index: torch.Tensor) -> FactorSet:
        """Rows ``index`` of the batch (beam reordering, batch selection, repeat-interleave)."""

        def sel_t(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index.to(t.device))

        def sel_q(q: QuantizedTensor) -> QuantizedTensor:
            return q.index_select(0, index)

        pairs = [(_map(t, sel_t, sel_q), _map(c, sel_t, sel_q)) for t, c in self.pairs]
        return FactorSet(pairs, int(index.numel()), self.length, self.heads, self.head_dim, self.joined)


@dataclass
class CompressedChunk:
    """One compressed chunk of a layer: tokens ``start … start + length - 1`` of the cache."""

    start: int
    length: int
    keys: FactorSet
    values: FactorSet
    keys_pre_rope: bool
    info: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def crop(self, length: int) -> CompressedChunk:
        return CompressedChunk(
            self.start,
            length,
            self.keys.crop(length),
            self.values.crop(length),
            self.keys_pre_rope,
            self.info,
        )

    def select_batch(self, index: torch.Tensor) -> CompressedChunk:
        return CompressedChunk(
            self.start,
            self.length,
            self.keys.select_batch(index),
            self.values.select_batch(index),
            self.keys_pre_rope,
            self.info,
        )
