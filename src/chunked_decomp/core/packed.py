"""Batched reconstruction of all compressed chunks of one layer (no transformers import).

Rebuilding chunk by chunk costs some twenty small tensor operations per chunk, head and step, and that overhead,
not arithmetic, dominated decoding. `PackedFactors` lays out the
factors of one kind (keys or values) of every chunk of a layer in a few flat buffers and turns each chunk's
factors into views of them, so no byte is held twice and the stored-byte count is unchanged. A rebuild is then
one dequantisation per buffer and one zero-padded batched matrix product per run of equal-length chunks.

Covers the layouts the presets use: one factor pair per KV head, either all quantised (groups along the last
dimension) or all plain tensors, the channel factors either each chunk's own or each head's basis shared by the
layer (`SharedRows`, ``basis_sharing``; then only the token factors are packed, and the Triton kernel reads a
copy of the quantised basis rows, the same rows for every factor of a head and every batch row, as long as no chunk
has correction rows; the fused C++ kernels read a channel factor per chunk and are not used). Joined heads keep the
chunk-by-chunk path; :meth:`PackedFactors.supports` says which.
"""

from __future__ import annotations

import torch

from chunked_decomp.core.factors import FactorSet, SharedRows
from chunked_decomp.core.quantization import QuantizedTensor, unpack_codes


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


class _FlatRole:
    """One role (token or channel factors) of one kind: every factor's storage concatenated in chunk, head order.

    After construction each factor's tensors are views of the flat buffers: quantised factors are re-pointed in
    place; plain tensors cannot be, so their views are in ``views`` for the caller to put back. ``offsets[i]`` is
    where factor ``i`` starts, as (code or plain-value offset, group offset); a span of factors whose rows all
    have the same length is dequantised in one go by :meth:`rows`.
    """

    def __init__(self, factors: list[torch.Tensor | QuantizedTensor], repoint: bool = True):
        self.quantized = isinstance(factors[0], QuantizedTensor)
        self.offsets = [(0, 0)]
        if self.quantized:
            q0 = factors[0]
            self.bits, self.group_size = q0.bits, q0.group_size
            self.codes = torch.cat([f.codes.reshape(-1) for f in factors])
            self.scale = torch.cat([f.scale.reshape(-1) for f in factors])
            self.minimum = torch.cat([f.minimum.reshape(-1) for f in factors])
            for f in factors:
                c, g = self.offsets[-1]
                if repoint:
                    f.codes = self.codes[c : c + f.codes.numel()].view(f.codes.shape)
                    f.scale = self.scale[g : g + f.scale.numel()].view(f.scale.shape)
                    f.minimum = self.minimum[g : g + f.minimum.numel()].view(f.minimum.shape)
                self.offsets.append((c + f.codes.numel(), g + f.scale.numel()))
        else:
            self.data = torch.cat([f.reshape(-1) for f in factors])
            self.views = []
            for f in factors:
                c, _ = self.offsets[-1]
                self.views.append(self.data[c : c + f.numel()].view(f.shape))
                self.offsets.append((c + f.numel(), 0))

    def rows_into(
        self, out: torch.Tensor, dest: torch.Tensor, first: int, last: int, n: int, dequant_into=None
    ) -> None:
        """``out.index_copy_(0, dest, self.rows(first, last, n))``. out: (N, n) float32. ``dequant_into``: a
        fused dequantiser of quantised rows on the CPU (`chunked_decomp.backends.cpu_kernel.dequant_into`'s
        signature), used in one pass instead when given."""
        if self.quantized and out.device.type == "cpu" and dequant_into is not None:
            (c0, g0), (c1, g1) = self.offsets[first], self.offsets[last]
            width, groups = -(-n * self.bits // 8), -(-n // self.group_size)
            dequant_into(
                out, dest, self.codes[c0:c1].view(-1, width), self.scale[g0:g1].view(-1, groups),
                self.minimum[g0:g1].view(-1, groups), self.bits, self.group_size, n,
            )  # fmt: skip
            return
        out.index_copy_(0, dest, self.rows(first, last, n))

    def rows(self, first: int, last: int, n: int) -> torch.Tensor:
        """Factors ``first … last - 1``, whose rows all hold ``n`` values, as (rows, n) float32."""
        (c0, g0), (c1, g1) = self.offsets[first], self.offsets[last]
        if not self.quantized:
            return self.data[c0:c1].view(-1, n).to(torch.float32)
        width = -(-n * self.bits // 8)
        codes = unpack_codes(self.codes[c0:c1].view(-1, width), self.bits, n)
        groups = -(-n // self.group_size)
        scale = self.scale[g0:g1].view(-1, groups).to(torch.float32)
        minimum = self.minimum[g0:g1].view(-1, groups).to(torch.float32)
        if n % self.group_size == 0:
            codes = codes.reshape(-1, groups, self.group_size).to(torch.float32)
            return torch.addcmul(minimum.unsqueeze(-1), codes, scale.unsqueeze(-1)).view(-1, n)
        scale = scale.repeat_interleave(self.group_size, dim=-1)[:, :n]
        minimum = minimum.repeat_interleave(self.group_size, dim=-1)[:, :n]
        return torch.addcmul(minimum, codes.to(torch.float32), scale)


def channels_of(sets: list[FactorSet], slots: list[tuple[int, int]]) -> list:
    """The channel factor of each slot (set index, head)."""
    return [sets[ci].pairs[h][1] for ci, h in slots]


class PackedFactors:
    """The factors of one kind of a layer's chunks, packed for a batched rebuild.

    Args:
        sets: the chunks' `FactorSet` of this kind, oldest first (consecutive in the cache), all per head with the
            same batch, heads and head_dim; their factors become views of this object's buffers.
    """

    def __init__(self, sets: list[FactorSet]):
        if not self.supports(sets):
            raise ValueError("PackedFactors needs per-head factor sets of one layout (see supports())")
        s0 = sets[0]
        self.batch, self.heads, self.head_dim = s0.batch, s0.heads, s0.head_dim
        self.length = sum(s.length for s in sets)
        tokens, channels, slots = [], [], []  # slots: (set index, head) of each stored pair, in buffer order
        for ci, s in enumerate(sets):
            for h, (t, c) in enumerate(s.pairs):
                if t is not None:
                    tokens.append(t)
                    channels.append(c)
                    slots.append((ci, h))
        self.token = _FlatRole(tokens) if tokens else None
        self._empty_device = self._device(sets)
        extra_of = self._pack_channels(channels, slots)
        if self.token is not None and not self.token.quantized:
            # Plain tensors cannot be re-pointed in place: put the views into the pairs.
            cviews = self.channel.views if self.channel is not None else channels_of(sets, slots)
            if self.extra is not None:
                for (i, _), ev in zip(extra_of, self.extra.views):
                    cviews[i] = SharedRows(cviews[i].basis, cviews[i].rank, ev)
            for (ci, h), tv, cv in zip(slots, self.token.views, cviews):
                sets[ci].pairs[h] = (tv, cv)
        self.basis_role: _FlatRole | None = None  # built when the Triton kernel asks (`triton_table`)
        self._table = self._factor_table(sets, slots, tokens)
        self._extra_rank = dict(extra_of)
        self.runs = self._runs(sets)

    def _pack_channels(self, channels: list, slots: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Pack the channel factors (``self.channel``), or, on a basis shared by the layer, note each head's
        stored rows (``self.shared``, held once by the layer, not packed) and pack the chunks' own correction rows
        (``self.extra``). Returns, per factor i with corrections, (i, rows of the shared basis it keeps)."""
        self.shared: list[SharedRows | None] | None = None
        self.extra: _FlatRole | None = None
        extra_of: list[tuple[int, int]] = []
        if channels and isinstance(channels[0], SharedRows):
            self.shared = [None] * self.heads
            for i, ((_, h), c) in enumerate(zip(slots, channels)):
                if self.shared[h] is None or c.rank > self.shared[h].rank:
                    self.shared[h] = c
                if c.extra is not None:
                    extra_of.append((i, c.rank))
            if extra_of:
                self.extra = _FlatRole([channels[i].extra for i, _ in extra_of])
            channels = []
        self.channel = _FlatRole(channels) if channels else None
        return extra_of

    def _factor_table(self, sets, slots, tokens) -> torch.Tensor | None:
        """Per factor: token code and group offsets, channel code and group offsets (0 on a shared basis), rank,
        length, first compressed position, head; (factors, 8) int32, the only per-factor state held besides the
        factors (8 words a factor: the rows each rebuild writes are derived from it)."""
        if self.token is None:
            return None
        starts = [0]
        for s in sets:
            starts.append(starts[-1] + s.length)
        rows = [
            (
                *self.token.offsets[i],
                *(self.channel.offsets[i] if self.channel is not None else (0, 0)),
                t.shape[-2],
                sets[ci].length,
                starts[ci],
                h,
            )
            for i, ((ci, h), t) in enumerate(zip(slots, tokens))
        ]
        return torch.tensor(rows, dtype=torch.int32).view(-1, 8)

    def _runs(self, sets: list[FactorSet]) -> list[dict]:
        """Runs of consecutive chunks of equal length, each rebuilt by one padded batched product: per run, its
        chunks, their length, the widest rank, its first compressed position, and which factors (and correction
        rows) it covers (plain ints: the rows each factor fills are derived when a rebuild needs them)."""
        runs = []
        factor_idx = extra_idx = position = 0
        i = 0
        while i < len(sets):
            j = i
            while j < len(sets) and sets[j].length == sets[i].length:
                j += 1
            ranks = [r for c in range(i, j) for r in sets[c].ranks]
            n_factors = sum(1 for r in ranks if r)
            n_extras = sum(1 for f in range(factor_idx, factor_idx + n_factors) if f in self._extra_rank)
            runs.append(
                dict(
                    chunks=j - i,
                    length=sets[i].length,
                    width=max(ranks + [1]),
                    start=position,
                    factors=(factor_idx, factor_idx + n_factors),
                    extras=(extra_idx, extra_idx + n_extras),
                )
            )
            factor_idx += n_factors
            extra_idx += n_extras
            position += (j - i) * sets[i].length
            i = j
        return runs

    def _rows_of(self, run: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the rows of a run's factors go in its (batch, head, chunk, width) buffer, in the order they are
        stored (factor, batch row, component), and where their correction rows go (after the shared rows each
        keeps); both int64. Products ordered (batch, head, chunk) give (batch, heads, tokens, d) as is."""
        f0, f1 = run["factors"]
        table = self._table[f0:f1].to(torch.int64)
        rank, head = table[:, 4], table[:, 7]
        chunk = (table[:, 6] - run["start"]) // run["length"]
        batch = torch.arange(self.batch)
        base = ((batch[None, :] * self.heads + head[:, None]) * run["chunks"] + chunk[:, None]) * run["width"]
        dest = _expand(base.flatten(), rank.repeat_interleave(self.batch))
        kept = [self._extra_rank[f] for f in range(f0, f1) if f in self._extra_rank]
        if not kept:
            return dest.to(device), dest.new_empty(0).to(device)
        has = torch.tensor([f in self._extra_rank for f in range(f0, f1)])
        shared = torch.tensor(kept, dtype=torch.int64)
        extra_base = (base[has] + shared[:, None]).flatten()
        extra = _expand(extra_base, (rank[has] - shared).repeat_interleave(self.batch))
        return dest.to(device), extra.to(device)

    @property
    def quantized(self) -> bool:
        """Whether token and channel factors are all quantised (the layout the fused kernels read); a shared basis
        counts when it is quantised and no chunk has correction rows."""
        if self.token is None or not self.token.quantized:
            return False
        if self.channel is not None:
            return self.channel.quantized
        return (
            self.shared is not None
            and self.extra is None
            and all(r is None or isinstance(r.basis, QuantizedTensor) for r in self.shared)
            and any(r is not None and r.basis is not None for r in self.shared)
        )

    @property
    def overhead_nbytes(self) -> int:
        """Bytes held besides the factors themselves: the per-factor table, and the Triton kernel's copy of a
        shared basis and its layout once built."""
        extra = [self._table]
        if self.basis_role is not None:
            extra += [
                self.basis_role.codes,
                self.basis_role.scale,
                self.basis_role.minimum,
                self._triton_table,
            ]
        layout = getattr(self, "_triton_layout", None)
        if layout is not None:
            extra += [v for v in layout[1].values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in extra if t is not None)

    @property
    def channel_shared(self) -> bool:
        """Whether the channel rows the kernels read are a shared basis (every batch row reads the same rows)."""
        return self.shared is not None

    @property
    def kernel_channel(self) -> _FlatRole | None:
        """The channel role the fused kernels read: the chunks' own factors, or a shared basis's copy (built now)."""
        if self.channel is not None:
            return self.channel
        self.triton_table()
        return self.basis_role

    def triton_table(self) -> torch.Tensor:
        """The per-factor table with the channel offsets of what the kernels read: the chunks' own channel factors,
        or, on a quantised shared basis, a copy of each head's rows in one flat buffer (built on first use; the
        layer keeps the originals), every factor of a head pointing at them and every batch row at the same rows
        (`channel_shared`). (factors, 8) int64."""
        if self.channel is not None or not self.quantized:
            return self._table.to(torch.int64)
        if self.basis_role is None:
            heads = [h for h, r in enumerate(self.shared) if r is not None and r.basis is not None]
            self.basis_role = _FlatRole([self.shared[h].basis for h in heads], repoint=False)
            at = {h: self.basis_role.offsets[i] for i, h in enumerate(heads)}
            table = self._table.to(torch.int64)
            table[:, 2:4] = torch.tensor([at[int(h)] for h in table[:, 7]], dtype=torch.int64).view(-1, 2)
            self._triton_table = table
        return self._triton_table

    @property
    def fusable(self) -> bool:
        """Whether the fused C++ kernel can read these factors: quantised token and channel factors on the CPU,
        each chunk with its own channel factor."""
        return self.quantized and not self.channel_shared and self.token.codes.device.type == "cpu"

    @property
    def basis_fusable(self) -> bool:
        """Whether the fused C++ kernel can score these factors from their codes on their shared basis
        (`basis_kernel_inputs`): quantised token factors (and correction rows, if any) on the CPU, on a basis
        shared by the layer."""
        return (
            self.shared is not None
            and self.token is not None
            and self.token.quantized
            and (self.extra is None or self.extra.quantized)
            and self.token.codes.device.type == "cpu"
        )

    def basis_kernel_inputs(self) -> tuple:
        """The arguments of `chunked_decomp.backends.cpu_kernel.basis_rope_scores` besides the query and tables:
        flat token codes, scales and minima as stored, the per-factor table, the token bits and group size; each
        head's basis rows decoded for this call, (heads, rows kept at most, d) float32, zero past a head's rows
        (decoded at each use, as `_basis`); the correction rows' codes, scales and minima, a (factors, 3) table
        of where each factor's start and how many shared rows it keeps (its rank where it has none), and their
        bits and group size."""
        t = self.token
        table = self._table.to(torch.int64)
        # Built per call from plain lists in one tensor (held, it would be bytes the cache does not report).
        rows, e0 = [], 0
        for f, rank in enumerate(table[:, 4].tolist()):
            if f in self._extra_rank:
                rows.append((*self.extra.offsets[e0], self._extra_rank[f]))
                e0 += 1
            else:
                rows.append((0, 0, rank))
        extra = torch.tensor(rows, dtype=torch.int64).view(-1, 3)
        if self.extra is not None:
            e = self.extra
            extras = (e.codes, e.scale, e.minimum, extra, e.bits, e.group_size)
        else:
            none = t.codes.new_empty(0)
            extras = (none, t.scale.new_empty(0), t.minimum.new_empty(0), extra, t.bits, t.group_size)
        basis = self._basis(max(int(extra[:, 2].max()), 1), t.codes.device)
        return (t.codes, t.scale, t.minimum, table, t.bits, t.group_size, basis, *extras)

    def kernel_inputs(self) -> tuple:
        """The arguments of `chunked_decomp.backends.cpu_kernel` after the query: flat token and channel codes with their
        scales and minima as stored (the kernel reads float32, float16 and bfloat16, so no copy is made), the
        per-factor table, and the bits and group sizes of both roles."""
        t, c = self.token, self.channel
        return (
            t.codes, t.scale, t.minimum,
            c.codes, c.scale, c.minimum,
            self._table.to(torch.int64), t.bits, t.group_size, c.bits, c.group_size,
        )  # fmt: skip

    def _basis(self, width: int, device: torch.device) -> torch.Tensor:
        """The shared basis rows of every head, decoded and zero-padded or cut to ``width``: (heads, width, d).
        Decoded at each use, not kept: held, it would be a float32 copy of bytes the cache stores at 4 bits."""
        out = torch.zeros(self.heads, width, self.head_dim, device=device)
        for h, rows in enumerate(self.shared):
            if rows is not None and rows.rank > 0:
                r = min(rows.rank, width)
                out[h, :r] = SharedRows(rows.basis, r).decode(torch.float32)
        return out

    def _device_of(self) -> torch.device:
        if self.token is None:
            return self._empty_device
        return self.token.codes.device if self.token.quantized else self.token.data.device

    @staticmethod
    def _device(sets: list[FactorSet]) -> torch.device:
        for s in sets:
            for t, _ in s.pairs:
                if t is not None:
                    return t.codes.device if isinstance(t, QuantizedTensor) else t.device
        return torch.device("cpu")

    @staticmethod
    def supports(sets: list[FactorSet]) -> bool:
        """Whether these sets have a layout this class packs (see the module docstring)."""
        if not sets or any(s.joined for s in sets):
            return False
        s0 = sets[0]
        kinds = set()
        bases: dict[int, object] = {}
        for s in sets:
            if (s.batch, s.heads, s.head_dim) != (s0.batch, s0.heads, s0.head_dim) or len(s.pairs) != s.heads:
                return False
            for h, (t, c) in enumerate(s.pairs):
                if t is None:
                    continue
                if c is None:
                    return False
                if isinstance(c, SharedRows):
                    # One basis per head, the same object in every chunk (its own rows, if any, are packed
                    # like channel factors).
                    if c.rank > 0 and bases.setdefault(h, c.basis) is not c.basis:
                        return False
                    kinds.add("shared")
                    c = t if c.extra is None else c.extra
                for f in (t, c):
                    if isinstance(f, QuantizedTensor):
                        if f.group_dim % len(f.shape) != len(f.shape) - 1:
                            return False
                        kinds.add(("q", f.bits if f is t else -f.bits, f.group_size))
                    else:
                        kinds.add(("t", f.dtype))
        if "shared" in kinds:
            # Channel factors all shared or none shared.
            kinds.discard("shared")
            if any(not isinstance(c, SharedRows) for s in sets for t, c in s.pairs if t is not None):
                return False
        quantized = {k[0] for k in kinds}
        # Token factors share one format, channel factors another (all quantised or all plain).
        return len(quantized) <= 1 and len(kinds) <= 2

    def factors(self, dequant_into=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The factors of each run of equal-length chunks, dequantised and zero-padded to the run's largest rank w:
        ``(token, channel)`` with token (batch, heads, n_chunks, w, T) and channel (batch, heads, n_chunks, w, d),
        float32, so that chunk c of head h is ``token[b, h, c].T @ channel[b, h, c]``: (T, d). ``dequant_into``: see
        ``_FlatRole.rows_into``."""
        device = self._device_of()
        out = []
        for run in self.runs:
            n, t, w = run["chunks"], run["length"], run["width"]
            p = n * self.batch * self.heads
            first, last = run["factors"]
            # Rows no factor writes (ranks below the run's width, heads of rank 0) stay zero.
            u = torch.zeros(p * w, t, device=device)
            if first == last:
                v = torch.zeros(p * w, self.head_dim, device=device)
            else:
                dest, extra_dest = self._rows_of(run, device)
                self.token.rows_into(u, dest, first, last, t, dequant_into)
                if self.shared is None:
                    v = torch.zeros(p * w, self.head_dim, device=device)
                    self.channel.rows_into(v, dest, first, last, self.head_dim, dequant_into)
                else:
                    v = torch.empty(p * w, self.head_dim, device=device)
                    # Every chunk of a head uses its basis rows (token rows past a chunk's rank are zero).
                    v.view(self.batch, self.heads, n, w, self.head_dim).copy_(
                        self._basis(w, device)[None, :, None]
                    )
                    e0, e1 = run["extras"]
                    if e0 != e1:
                        # Chunks with their own rows: those follow the shared rows they keep.
                        self.extra.rows_into(v, extra_dest, e0, e1, self.head_dim, dequant_into)
            out.append(
                (u.view(self.batch, self.heads, n, w, t), v.view(self.batch, self.heads, n, w, self.head_dim))
            )
        return out

    def reconstruct(self, dequant_into=None) -> torch.Tensor:
        """Every chunk of this kind rebuilt: (batch, heads, total length, head_dim), float32 (``dequant_into``:
        see ``_FlatRole.rows_into``)."""
        if self.token is None:
            return torch.zeros(self.batch, self.heads, self.length, self.head_dim, device=self._device_of())
        outs = []
        for u, v in self.factors(dequant_into):
            b, h, n, w, t = u.shape
            # (batch, heads, chunk) products: the result is (batch, heads, tokens, d) as is.
            x = torch.bmm(u.view(-1, w, t).transpose(1, 2), v.view(-1, w, self.head_dim))
            outs.append(x.view(b, h, n * t, self.head_dim))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _expand(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + c) for s, c in zip(starts, counts)])`` without a loop: int64."""
    total = int(counts.sum())
    offsets = torch.cumsum(counts, 0) - counts
    return starts.repeat_interleave(counts) + torch.arange(total) - offsets.repeat_interleave(counts)
