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
from functools import cached_property

import torch

from chunked_decomp.quantization import QuantizedTensor, quantize, quantized_nbytes


@dataclass
class SharedRows:
    """The first ``rank`` rows of a basis shared by every chunk of a layer (``basis_sharing="layer"``).

    basis: (columns, columns), row j = component j, held once by the layer — so a chunk stores no channel
    factor and these rows count 0 bytes here (the layer counts the basis once).
    """

    basis: torch.Tensor
    rank: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rank, self.basis.shape[-1])


Factor = torch.Tensor | QuantizedTensor | SharedRows | None


@dataclass
class FactorCodec:
    """How factors are stored: quantised (bits, group size) or cast to ``factor_dtype``.

    The token factor is kept transposed, ``(batch, r, T)``, so both factors have the rank on dim -2 and their
    values run along the last dim: quantisation groups and bit packing both run along tokens (resp. channels)
    within one component, every component gets its own scales, and the bytes are exactly linear in the rank.
    """

    quantize: bool
    token_bits: int
    channel_bits: int
    group_size: int
    factor_dtype: torch.dtype

    def encode(self, token_t: torch.Tensor, channel: torch.Tensor) -> tuple[Factor, Factor]:
        """token_t: (..., k, T), channel: (..., k, n) float32 → stored factors at full rank k.

        Take a rank-r part with :func:`take_rank`; each component (row) is encoded on its own, so slicing
        rows of the encoded factors equals encoding the sliced factors.
        """
        if not self.quantize:
            return token_t.to(self.factor_dtype), channel.to(self.factor_dtype)
        t, bits, gs = token_t.shape[-1], self.token_bits, self.group_size
        if bits == self.channel_bits and t * bits % 8 == 0 and token_t.shape[:-1] == channel.shape[:-1]:
            # One quantisation of each component's token row and channel row side by side, split afterwards,
            # gives the same codes and scales as two (half the small-tensor calls): the token row is padded to
            # whole groups with its last value, as quantize pads, so no group spans both. Views of one buffer.
            groups = -(-t // gs)
            padded = groups * gs
            pad = token_t[..., -1:].expand(*token_t.shape[:-1], padded - t)
            both = quantize(
                torch.cat([token_t, pad, channel], -1), bits, gs, group_dim=-1, scale_dtype=self.factor_dtype
            )
            token = QuantizedTensor(
                both.codes[..., : t * bits // 8],
                both.scale[..., :groups],
                both.minimum[..., :groups],
                tuple(token_t.shape), bits, gs, -1, both.dtype,
            )  # fmt: skip
            chan = QuantizedTensor(
                both.codes[..., padded * bits // 8 :],
                both.scale[..., groups:],
                both.minimum[..., groups:],
                tuple(channel.shape), bits, gs, -1, both.dtype,
            )  # fmt: skip
            return token, chan
        return (
            quantize(token_t, self.token_bits, self.group_size, group_dim=-1, scale_dtype=self.factor_dtype),
            quantize(
                channel, self.channel_bits, self.group_size, group_dim=-1, scale_dtype=self.factor_dtype
            ),
        )

    def encode_tokens(self, token_t: torch.Tensor) -> Factor:
        """Only the token factor (..., k, T), for chunks whose channel factor is a shared basis."""
        if not self.quantize:
            return token_t.to(self.factor_dtype)
        return quantize(
            token_t, self.token_bits, self.group_size, group_dim=-1, scale_dtype=self.factor_dtype
        )

    def rank_cost(self, batch: int, m: int, n: int, shared_basis: bool = False) -> int:
        """Bytes one rank (one component) costs for a (batch, m, n) matrix: a token row plus a channel row
        (no channel row when the basis is shared by the layer)."""
        scale_bytes = torch.empty((), dtype=self.factor_dtype).element_size()
        channel_rows = 0 if shared_basis else 1
        if not self.quantize:
            return batch * (m + n * channel_rows) * scale_bytes
        return quantized_nbytes(
            (batch, 1, m), self.token_bits, self.group_size, -1, scale_bytes
        ) + channel_rows * (
            quantized_nbytes((batch, 1, n), self.channel_bits, self.group_size, -1, scale_bytes)
        )

    def cost(self, batch: int, m: int, n: int) -> Callable[[int], int]:
        """bytes(r) stored for a (batch, m, n) matrix at rank r."""
        per_rank = self.rank_cost(batch, m, n)
        return lambda r: r * per_rank


def take_rank(f: Factor, r: int) -> Factor:
    """The first ``r`` components (rows on dim -2) of an encoded factor, copied; ``None`` when r == 0."""
    if f is None or r == 0:
        return None
    if isinstance(f, SharedRows):
        return SharedRows(f.basis, r)
    if isinstance(f, QuantizedTensor):
        return f.narrow_prefix(-2, r)
    return f[..., :r, :].clone()


def _decode(f: Factor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(f, SharedRows):
        return f.basis[: f.rank].to(dtype)
    if isinstance(f, QuantizedTensor):
        return f.dequantize().to(dtype)
    return f.to(dtype)


def _nbytes(f: Factor) -> int:
    if f is None or isinstance(f, SharedRows):
        return 0
    if isinstance(f, QuantizedTensor):
        return f.nbytes
    return f.numel() * f.element_size()


def _map(f: Factor, fn_tensor: Callable, fn_q: Callable) -> Factor:
    if f is None or isinstance(f, SharedRows):
        return f
    if isinstance(f, QuantizedTensor):
        return fn_q(f)
    return fn_tensor(f)


@dataclass
class FactorSet:
    """Factors of one kind (keys or values) of one chunk.

    pairs: one ``(token_t, channel)`` per group; token_t: (batch, r_g, T) (transposed), channel: (batch, r_g, n_g).
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
        return [0 if t is None else t.shape[-2] for t, _ in self.pairs]

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
                outs.append(_decode(token, dtype).transpose(-1, -2) @ _decode(channel, dtype))
        if self.joined:
            x = outs[0].reshape(self.batch, self.length, self.heads, self.head_dim)
            return x.transpose(1, 2)
        return torch.stack(outs, dim=1)

    def crop(self, length: int) -> FactorSet:
        """Keep the first ``length`` tokens (token factors are sliced; channel factors are shared)."""

        def cut_t(t: torch.Tensor) -> torch.Tensor:
            return t[..., :length].clone()

        def cut_q(q: QuantizedTensor) -> QuantizedTensor:
            return q.narrow_prefix(-1, length)

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

    @cached_property
    def nbytes(self) -> int:
        """Bytes stored (fixed once built: cropping or batch selection makes a new chunk)."""
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
