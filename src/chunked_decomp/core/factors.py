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

from chunked_decomp.core.quantization import QuantizedTensor, quantize, quantized_nbytes


@dataclass
class SharedRows:
    """A chunk's channel factor on a basis shared by every chunk of a layer (``basis_sharing``): the basis's
    first ``rank`` rows, then the chunk's own correction rows, if any.

    basis: (rows, columns), row j = component j, stored once by the layer (a tensor in ``factor_dtype`` or a
    `QuantizedTensor` at ``basis_bits``), so it counts 0 bytes here (the layer counts it once); ``rank`` <= rows.
    extra: (batch, r_c, columns) or None, the chunk's own rows for what the shared ones miss (encoded like any
    channel factor, and counted here). The chunk's token factor holds rank + r_c rows, in that order.
    """

    basis: torch.Tensor | QuantizedTensor | None
    rank: int
    extra: torch.Tensor | QuantizedTensor | None = None

    @property
    def extra_rank(self) -> int:
        return 0 if self.extra is None else self.extra.shape[-2]

    @property
    def shape(self) -> tuple[int, int]:
        cols = (self.basis if self.basis is not None else self.extra).shape[-1]
        return (self.rank + self.extra_rank, cols)

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """(rank, columns) in ``dtype``, or (batch, rank + r_c, columns) with correction rows."""
        if self.rank == 0 and self.extra is not None:  # no shared row kept (the basis may hold none)
            return _decode(self.extra, dtype)
        if isinstance(self.basis, QuantizedTensor):
            rows = self.basis
            if rows.shape[-2] != self.rank:
                rows = rows.narrow_prefix(-2, self.rank)
            rows = rows.dequantize().to(dtype)
        else:
            rows = self.basis[..., : self.rank, :].to(dtype)
        if self.extra is None:
            return rows
        extra = _decode(self.extra, dtype)
        return torch.cat([rows.expand(extra.shape[0], -1, -1), extra], dim=-2)


Factor = torch.Tensor | QuantizedTensor | SharedRows | None


@dataclass(frozen=True)
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
    shared_bits: int | None = None
    channel_group_size: int | None = None

    @property
    def channel_group(self) -> int:
        """Values per quantisation group of channel factors and shared bases (``group_size`` by default)."""
        return self.group_size if self.channel_group_size is None else self.channel_group_size

    @property
    def basis_bits(self) -> int:
        """Bits of a basis shared by a layer's chunks: ``shared_bits``, else ``channel_bits``."""
        return self.channel_bits if self.shared_bits is None else self.shared_bits

    def encode(self, token_t: torch.Tensor, channel: torch.Tensor) -> tuple[Factor, Factor]:
        """token_t: (..., k, T), channel: (..., k, n) float32 → stored factors at full rank k.

        Take a rank-r part with :func:`take_rank`; each component (row) is encoded on its own, so slicing
        rows of the encoded factors equals encoding the sliced factors.
        """
        if not self.quantize:
            return token_t.to(self.factor_dtype), channel.to(self.factor_dtype)
        t, bits, gs = token_t.shape[-1], self.token_bits, self.group_size
        if (
            bits == self.channel_bits
            and self.channel_group == gs
            and t * bits % 8 == 0
            and token_t.shape[:-1] == channel.shape[:-1]
        ):
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
                channel, self.channel_bits, self.channel_group, group_dim=-1, scale_dtype=self.factor_dtype
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
            quantized_nbytes((batch, 1, n), self.channel_bits, self.channel_group, -1, scale_bytes)
        )

    def encode_basis(self, rows: torch.Tensor) -> Factor:
        """rows: (k, n) float32, a basis shared by a layer's chunks → stored like a channel factor (``basis_bits``
        per value, each row its own scales), so row j costs :meth:`basis_row_cost` bytes and any prefix of rows
        is the encoding of that prefix."""
        if not self.quantize:
            return rows.to(self.factor_dtype)
        return quantize(
            rows, self.basis_bits, self.channel_group, group_dim=-1, scale_dtype=self.factor_dtype
        )

    def basis_row_cost(self, n: int) -> int:
        """Bytes of one row of a shared basis over ``n`` columns (see :meth:`encode_basis`)."""
        scale_bytes = torch.empty((), dtype=self.factor_dtype).element_size()
        if not self.quantize:
            return n * scale_bytes
        return quantized_nbytes((1, n), self.basis_bits, self.channel_group, -1, scale_bytes)

    def cost(self, batch: int, m: int, n: int) -> Callable[[int], int]:
        """bytes(r) stored for a (batch, m, n) matrix at rank r."""
        per_rank = self.rank_cost(batch, m, n)
        return lambda r: r * per_rank


def take_rank(f: Factor, r: int) -> Factor:
    """The first ``r`` components (rows on dim -2) of an encoded factor, copied; ``None`` when r == 0."""
    if f is None or r == 0:
        return None
    if isinstance(f, SharedRows):
        if f.extra is not None:
            raise ValueError("a channel factor with correction rows cannot be cut to a rank")
        return SharedRows(f.basis, r)
    if isinstance(f, QuantizedTensor):
        return f.narrow_prefix(-2, r)
    return f[..., :r, :].clone()


def cat_rows(a: torch.Tensor | QuantizedTensor | None, b: torch.Tensor | QuantizedTensor) -> Factor:
    """Rows of ``a`` then rows of ``b`` (dim -2), in a new buffer; encoded alike (quantised ones grouped along
    the last dimension, with equal bits and group size). ``a`` None: a copy of ``b``."""
    if a is None:
        return take_rank(b, b.shape[-2])
    if isinstance(a, QuantizedTensor):
        return QuantizedTensor(
            torch.cat([a.codes, b.codes], -2),
            torch.cat([a.scale, b.scale], -2),
            torch.cat([a.minimum, b.minimum], -2),
            (*a.shape[:-2], a.shape[-2] + b.shape[-2], a.shape[-1]),
            a.bits, a.group_size, a.group_dim, a.dtype,
        )  # fmt: skip
    return torch.cat([a, b], dim=-2)


def _decode(f: Factor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(f, SharedRows):
        return f.decode(dtype)
    if isinstance(f, QuantizedTensor):
        return f.dequantize().to(dtype)
    return f.to(dtype)


def factor_nbytes(f: Factor) -> int:
    if isinstance(f, SharedRows):
        return factor_nbytes(f.extra)
    if f is None:
        return 0
    if isinstance(f, QuantizedTensor):
        return f.nbytes
    return f.numel() * f.element_size()


def _map(f: Factor, fn_tensor: Callable, fn_q: Callable) -> Factor:
    if isinstance(f, SharedRows):
        return f if f.extra is None else SharedRows(f.basis, f.rank, _map(f.extra, fn_tensor, fn_q))
    if f is None:
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
        return sum(factor_nbytes(t) + factor_nbytes(c) for t, c in self.pairs)

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

    def copied(self) -> FactorSet:
        """The same factors in storage of their own (a factor may be a view of a buffer shared with others)."""

        def copy_q(q: QuantizedTensor) -> QuantizedTensor:
            return q.narrow_prefix(-2, q.shape[-2])

        pairs = [(_map(t, torch.clone, copy_q), _map(c, torch.clone, copy_q)) for t, c in self.pairs]
        return FactorSet(pairs, self.batch, self.length, self.heads, self.head_dim, self.joined)

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

    def copied(self) -> CompressedChunk:
        """This chunk with its factors in storage of their own."""
        return CompressedChunk(
            self.start, self.length, self.keys.copied(), self.values.copied(), self.keys_pre_rope, self.info
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
