"""Factoring a stack of equal-length chunks at full rank, before any rank is chosen or any factor encoded.

Chunks of one length (of one or several layers) are factored in one batched call: each group of each chunk is
a matrix ``(T, columns)`` (a KV head, or every head joined). A kind with a layer's shared basis is projected on
that basis instead (`SharedBasis.frames_for`). Ranks are chosen afterwards from the energies, and only the
components some chunk keeps are encoded (:func:`encode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunked_decomp.core.decomposition import GramBasis, factorize, gram_basis
from chunked_decomp.core.factors import FactorCodec


@dataclass
class Factored:
    """Float factors of a stack of equal-length chunks of one kind, before encoding.

    token_t: (n_chunks, groups, batch, k, T); channel: (n_chunks, groups, batch, k, columns) or one `SharedRows`
    per group; energy: (n_chunks, groups, k), each component's share of the squared norm (batch mean). With a
    ``basis`` (the Gram route), token_t and channel are ``None`` and formed by :meth:`token_rows` /
    :meth:`channel_rows` for the components kept; ``dims`` = (batch, T).
    """

    token_t: torch.Tensor | None
    channel: torch.Tensor | list | None
    energy: torch.Tensor
    groups: int
    columns: int
    basis: GramBasis | None = None
    dims: tuple[int, int] = (1, 1)
    # With a shared basis: (groups, k, k), coefficients on its orthonormal rows → on its stored rows.
    mix: torch.Tensor | None = None

    def token_rows(self, top: int) -> torch.Tensor:
        """The first ``top`` token rows, (n_chunks, groups, batch, top, T), contiguous."""
        if self.basis is None:
            return self.token_t[..., :top, :].contiguous()
        b, t = self.dims
        rows = self.basis.tokens(top).reshape(-1, b, self.groups, t, top)
        return rows.permute(0, 2, 1, 4, 3).contiguous()

    def channel_rows(self, top: int) -> torch.Tensor:
        """The first ``top`` channel rows, (n_chunks, groups, batch, top, columns), contiguous."""
        if self.basis is None:
            return self.channel[..., :top, :].contiguous()
        b, _ = self.dims
        rows = self.basis.channels(top).reshape(-1, b, self.groups, top, self.columns)
        return rows.permute(0, 2, 1, 3, 4).contiguous()

    def part(self, first: int, last: int) -> Factored:
        """Chunks ``first … last - 1`` of the stack (views)."""
        if self.basis is not None:
            per_chunk = self.dims[0] * self.groups
            basis = self.basis.rows(first * per_chunk, last * per_chunk)
            return Factored(None, None, self.energy[first:last], self.groups, self.columns, basis, self.dims)
        channel = self.channel if isinstance(self.channel, list) else self.channel[first:last]
        return Factored(
            self.token_t[first:last],
            channel,
            self.energy[first:last],
            self.groups,
            self.columns,
            mix=self.mix,
        )


def matrices(x: torch.Tensor, joined: bool) -> torch.Tensor:
    """x: (n_chunks, batch, heads, T, d) → (n_chunks * batch * groups, T, columns): one matrix per head, or one
    per chunk and batch row over every head's channels when ``joined``."""
    n, b, h, t, d = x.shape
    if joined:
        return x.permute(0, 1, 3, 2, 4).reshape(n * b, t, h * d)
    return x.reshape(n * b * h, t, d)


def factor_chunks(x: torch.Tensor, kind: str, plan, basis=None) -> Factored:
    """Factor a stack of chunks x: (n_chunks, batch, heads, T, d) float32 at full rank (not yet encoded).

    ``plan``: the `CompressionPlan` (head layout, factoriser, target rank, codec); ``basis``: the layer's
    `SharedBasis` when ``kind`` ("k", "v", or "kv" for keys and values stacked) is projected on one.
    """
    n, b, h, t, d = x.shape
    g = 1 if plan.joined else h
    mats = matrices(x, plan.joined)
    cols = mats.shape[-1]
    if basis is not None and basis.shares(kind):
        xg = mats.reshape(n, b, g, t, cols)
        q, mix = basis.frames_for(kind, xg, plan.codec)  # (g, cols, cols) each
        coeffs = torch.einsum("nbgtc,gkc->nbgtk", xg, q)
        token_t = coeffs.permute(0, 2, 1, 4, 3)
        energy = coeffs.double().pow(2).sum(3)  # (n, b, g, k)
        energy = (energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)).mean(1)
        # Ranks keep a prefix of the basis order: make the shares non-increasing along it.
        energy = energy.flip(-1).cummax(-1).values.flip(-1).float()
        # The channel factors (`SharedRows`) are set once the stored rows are known (`SharedBasis.apply_ranks`).
        return Factored(token_t, [], energy, g, cols, mix=mix)
    method = plan.factorizer_for(mats.device.type)
    if method == "gram" and cols <= t:
        # Only the basis now: the factors are formed at encoding, for the components some chunk keeps.
        gb = gram_basis(mats)
        token_t, channel, spectrum = None, None, gb.spectrum
    else:
        fac = factorize(mats, method, rank=plan.target_rank, check_finite=False)
        k = fac.spectrum.shape[-1]
        gb, spectrum = None, fac.spectrum
        token_t = fac.token_factor.reshape(n, b, g, t, k).permute(0, 2, 1, 4, 3)
        channel = fac.channel_factor.reshape(n, b, g, k, cols).permute(0, 2, 1, 3, 4)
    k = spectrum.shape[-1]
    energy = spectrum.reshape(n, b, g, k).permute(0, 2, 1, 3).double() ** 2
    energy = (energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)).mean(2).float()
    return Factored(token_t, channel, energy, g, cols, gb, (b, t))


def encode(f: Factored, top: int, codec: FactorCodec) -> tuple:
    """Encode the first ``top`` components of every factor of ``f`` (components are encoded one by one, so
    this equals encoding all and keeping a prefix). Returns (token, channel) as stored, each
    (n_chunks, groups, batch, top, ·), the channel a list of `SharedRows` with a shared basis."""
    top = max(top, 1)
    token_t = f.token_rows(top)
    if isinstance(f.channel, list):
        return codec.encode_tokens(token_t), f.channel
    return codec.encode(token_t, f.channel_rows(top))
