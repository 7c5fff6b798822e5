"""A transformers cache whose older tokens are stored as chunked low-rank factors.

`ChunkedSVDLayer` is built in the mould of transformers' `QuantizedLayer(DynamicLayer)`: the most recent
tokens stay exact in ``self.keys`` / ``self.values`` (the residual window) and the first tokens stay exact as
attention sinks; each time a chunk of ``chunk_size`` tokens ages out of the window it is factored into low rank
(keys with their rotary embedding undone first), its rank chosen from a byte budget, and optionally quantised.
`update` returns full-length keys and values — compressed chunks rebuilt, then re-rotated — so every attention
implementation, mask and generation strategy works unchanged. With ``parallel_processing`` (the default),
`ChunkedSVDCache` lets the aged chunks wait exact until the last layer of the forward pass, then compresses the
chunks of all layers in batched calls (`_compress_layers`).

Layout along the sequence of a layer, all ``(batch, kv_heads, ·, head_dim)``::

    [ sinks (exact) | chunk 0 | chunk 1 | … (factors) | residual window (exact) ]
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from chunked_decomp import kernels, triton_attention
from chunked_decomp.attention import FactoredContext, use_factored_attention
from chunked_decomp.config import CompressionConfig
from chunked_decomp.decomposition import (
    GramBasis,
    choose_ranks_linear,
    factorize,
    gram_basis,
    relative_error,
    single_thread_lapack,
)
from chunked_decomp.factors import (
    CompressedChunk,
    Factor,
    FactorCodec,
    FactorSet,
    SharedRows,
    cat_rows,
    factor_nbytes,
    take_rank,
)
from chunked_decomp.packed import PackedFactors
from chunked_decomp.quantization import QuantizedTensor
from chunked_decomp.rotary import range_cos_sin, rotate, rotate_range

logger = logging.getLogger("chunked_decomp")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Share of one chunk's allowance that may go to paying back bytes spent beyond the budget earlier (the exact
# sink tokens): the debt is spread over the first few chunks instead of starving the first one.
_MAX_REPAYMENT = 0.25


@dataclass
class LayerMemoryStats:
    """Bytes and tokens of one layer. ``aged`` = sinks + compressed chunks (what the budget governs)."""

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


@dataclass
class CacheMemoryStats:
    """Totals over layers; ratios are ``stored / uncompressed`` (cache dtype) and ``stored / reference``."""

    per_layer: list[LayerMemoryStats] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.per_layer)

    @property
    def stored_bytes(self) -> int:
        return self._sum("stored_bytes")

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
            "per_layer": [vars(s) for s in self.per_layer],
        }


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class ChunkedSVDLayer(DynamicLayer):
    """One layer's cache: exact sinks, low-rank chunks, exact residual window.

    Args:
        config: the compression options.
        layer_idx: index of the layer (for logging and statistics).
        inv_freq: (rotary_dim // 2,) inverse frequencies of the model's rotary embedding, or ``None`` for models
            without one (GPT-2); keys are then factored as they are.
    """

    is_croppable = True

    def __init__(self, config: CompressionConfig, layer_idx: int = 0, inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.inv_freq = inv_freq
        self.chunks: list[CompressedChunk] = []
        # The chunks' factors packed for a fast rebuild; None = to build, False = layout not packable.
        self._packed: tuple | bool | None = None
        self._rank_costs: dict[tuple[int, int, int], int] = {}
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.sink_region = config.num_sink_tokens
        self.compression_seconds = 0.0
        # Set by ChunkedSVDCache with parallel_processing: update() leaves aged tokens exact, and the cache
        # compresses the chunks of all its layers together at the end of the forward pass.
        self.defer_aging = False
        # basis_sharing="layer": per kind ("k"/"v"), one encoded basis per group, (rows, columns), rows =
        # components, cut to the rank the first span compressed keeps (later chunks keep at most that many).
        self.shared_bases: dict[str, list[Factor]] = {}
        # Between factoring and allocating that first span: each group's full basis, encoded, not yet counted.
        self._basis_drafts: dict[str, list[Factor]] = {}
        # Per kind: (q, mix) of the stored rows (see _shared_basis), derived from them once.
        self._basis_frames: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- bookkeeping -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self.batch, self.heads, _, self.head_dim = key_states.shape
        self.v_head_dim = value_states.shape[-1]
        self.sink_keys = key_states[..., :0, :]
        self.sink_values = value_states[..., :0, :]
        ref = self.config.reference_dtype
        self.reference_element_size = (
            _DTYPES[ref].itemsize if ref is not None else torch.empty((), dtype=self.dtype).element_size()
        )
        hw = self.config.head_weights
        if hw is not None and len(hw[0][0]) != self.heads:
            raise ValueError(
                f"head_weights gives {len(hw[0][0])} weights per layer and kind, layer {self.layer_idx} has "
                f"{self.heads} KV heads"
            )
        self.codec = FactorCodec(
            quantize=self.config.use_quantization,
            token_bits=self.config.quantization_bits,
            channel_bits=self.config.basis_bits,
            shared_bits=self.config.shared_basis_bits,
            group_size=self.config.quant_group_size,
            factor_dtype=_DTYPES[self.config.factor_dtype],
        )

    @property
    def sink_length(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    @property
    def tail_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    @property
    def compressed_length(self) -> int:
        return sum(c.length for c in self.chunks)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_length + self.compressed_length + self.tail_length

    def _token_bytes(self, element_size: int) -> int:
        """Bytes of one token (keys + values, whole batch) in an uncompressed cache of that element size."""
        return self.batch * self.heads * (self.head_dim + self.v_head_dim) * element_size

    def _aged_stored_bytes(self) -> int:
        bases = sum(factor_nbytes(b) for rows in self.shared_bases.values() for b in rows)
        return (
            _nbytes(self.sink_keys) + _nbytes(self.sink_values) + bases + sum(c.nbytes for c in self.chunks)
        )

    def memory_stats(self) -> LayerMemoryStats:
        """Bytes really held by this layer, and the bytes an uncompressed cache would hold."""
        if not self.is_initialized:
            return LayerMemoryStats(self.layer_idx, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        aged_tokens = self.sink_length + self.compressed_length
        seq = self.get_seq_length()
        elem = torch.empty((), dtype=self.dtype).element_size()
        aged_stored = self._aged_stored_bytes()
        k_ranks = [sum(c.keys.ranks) / max(len(c.keys.ranks), 1) for c in self.chunks]
        v_ranks = [sum(c.values.ranks) / max(len(c.values.ranks), 1) for c in self.chunks]
        return LayerMemoryStats(
            layer_idx=self.layer_idx,
            seq_length=seq,
            exact_tokens=self.sink_length + self.tail_length,
            compressed_tokens=self.compressed_length,
            stored_bytes=aged_stored + _nbytes(self.keys) + _nbytes(self.values),
            aged_stored_bytes=aged_stored,
            uncompressed_bytes=seq * self._token_bytes(elem),
            aged_uncompressed_bytes=aged_tokens * self._token_bytes(elem),
            reference_bytes=seq * self._token_bytes(self.reference_element_size),
            aged_reference_bytes=aged_tokens * self._token_bytes(self.reference_element_size),
            mean_key_rank=sum(k_ranks) / len(k_ranks) if k_ranks else 0.0,
            mean_value_rank=sum(v_ranks) / len(v_ranks) if v_ranks else 0.0,
        )

    # ---- the transformers layer interface ----------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(batch, kv_heads, q_len, head_dim)`` states; return the full keys and values.

        The returned tensors hold every cached token (compressed chunks rebuilt) followed by the new ones exactly;
        chunks that age out of the residual window are compressed afterwards, for the next call.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch:
            raise ValueError(
                f"layer {self.layer_idx}: batch size changed from {self.batch} to {key_states.shape[0]} "
                "without batch_select_indices / batch_repeat_interleave"
            )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.config.decode_attention == "factored" and self.chunks:
            keys_out, values_out = self.factored_context().handles()
        else:
            keys_out, values_out = self._full_states()
        if not self.defer_aging:
            _age_layers([self], final=False)
        return keys_out, values_out

    def factored_context(self) -> FactoredContext:
        """This layer's states for :func:`~chunked_decomp.attention.factored_attention`: exact sinks and tail,
        chunks as factors (values always; keys unless factored before the rotary embedding, then rebuilt: as
        factored with the cos / sin tables for the fused kernel to rotate them, or rotated here without it)."""
        ctx = FactoredContext(self.sink_keys, self.sink_values, self.keys, self.values)
        packed = self._packed_factors()
        if packed is None:
            ctx.keys, ctx.values = self.reconstruct_compressed()
            return ctx
        pre_rope = [c.keys_pre_rope for c in self.chunks]
        if (
            packed[0].quantized
            and packed[1].quantized
            and triton_attention.usable(self.device)
            and (all(pre_rope) or not any(pre_rope))
        ):
            # On a GPU, quantised factors are read by the Triton kernel, which rotates pre-rotary keys on chip.
            ctx.key_packed, ctx.value_packed, ctx.triton = packed[0], packed[1], True
            if pre_rope[0]:
                ctx.rope = (self.inv_freq, self.chunks[0].start)
            return ctx
        # Quantised factors on the CPU are read packed by the fused kernel when it is built.
        fused = packed[1].fusable and kernels.available()
        if fused:
            ctx.value_packed = packed[1]
        else:
            ctx.value_runs = packed[1].factors()
        if all(pre_rope) and self.device.type == "cpu" and kernels.available():
            # Pre-rotary keys rebuilt as factored; the fused kernel rotates them while it scores them.
            ctx.keys = packed[0].reconstruct()
            ctx.keys_rope = range_cos_sin(
                self.chunks[0].start, ctx.keys.shape[-2], self.inv_freq, self.device
            )
        elif any(pre_rope):
            ctx.keys = self._rotate_back(packed[0].reconstruct())
        elif fused and packed[0].fusable:
            ctx.key_packed = packed[0]
        else:
            ctx.key_runs = packed[0].factors()
        return ctx

    def _full_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.chunks:
            if self.sink_length == 0:
                return self.keys, self.values
            return torch.cat([self.sink_keys, self.keys], -2), torch.cat([self.sink_values, self.values], -2)
        rk, rv = self.reconstruct_compressed()
        return (
            torch.cat([self.sink_keys, rk, self.keys], dim=-2),
            torch.cat([self.sink_values, rv, self.values], dim=-2),
        )

    def reconstruct_compressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of all compressed chunks, (batch, kv_heads, compressed_length, head_dim), cache dtype."""
        packed = self._packed_factors()
        if packed is not None:
            keys, values = packed[0].reconstruct(), packed[1].reconstruct().to(self.dtype)
        else:
            keys = torch.cat([c.keys.reconstruct(torch.float32, self.device) for c in self.chunks], dim=-2)
            values = torch.cat([c.values.reconstruct(self.dtype, self.device) for c in self.chunks], dim=-2)
        return self._rotate_back(keys).to(self.dtype), values

    def _rotate_back(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (batch, kv_heads, compressed_length, d) as factored → in the model's rotary frame: chunks factored
        before the rotary embedding are rotated forward to their positions, the others left as they are."""
        rotated = [c.keys_pre_rope for c in self.chunks]
        if not any(rotated):
            return keys
        # Chunks are contiguous from the sinks on, so one rotation covers them all.
        start = self.chunks[0].start
        if all(rotated):
            return rotate_range(keys, start, self.inv_freq)
        pos = torch.arange(start, start + keys.shape[-2], device=keys.device)
        mask = torch.cat([torch.full((c.length,), c.keys_pre_rope) for c in self.chunks]).to(keys.device)
        return torch.where(mask[:, None], rotate(keys, pos, self.inv_freq), keys)

    def _packed_factors(self) -> tuple[PackedFactors, PackedFactors] | None:
        """The chunks' factors packed for a batched rebuild (built when the chunks changed), or None where
        their layout is not one `PackedFactors` handles."""
        if self._packed is None:
            k_sets, v_sets = [c.keys for c in self.chunks], [c.values for c in self.chunks]
            if PackedFactors.supports(k_sets) and PackedFactors.supports(v_sets):
                self._packed = (PackedFactors(k_sets), PackedFactors(v_sets))
            else:
                self._packed = False
        return self._packed or None

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.3 passes cache_position instead
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        # transformers < 5.3 zeroes the exact tensors in place instead of dropping them: drop them here too.
        self.keys = self.values = None
        self.is_initialized = False
        self.chunks = []
        self._packed = None
        self.shared_bases = {}
        self._basis_drafts = {}
        self._basis_frames = {}
        self.sink_keys = self.sink_values = None

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (negative, as in `DynamicLayer.crop`)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove} "
                "(use -n to remove the last n tokens)"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        new_len = max(self.get_seq_length() + tokens_to_remove, 0)
        tail_start = self.sink_length + self.compressed_length
        if new_len >= tail_start:
            self.keys = self.keys[..., : new_len - tail_start, :]
            self.values = self.values[..., : new_len - tail_start, :]
            return
        self.keys = self.keys[..., :0, :]
        self.values = self.values[..., :0, :]
        kept = []
        for c in self.chunks:
            if c.start + c.length <= new_len:
                kept.append(c)
            elif c.start < new_len:
                kept.append(c.crop(new_len - c.start))
        self.chunks = kept
        self._packed = None
        if new_len < self.sink_length:
            self.sink_keys = self.sink_keys[..., :new_len, :]
            self.sink_values = self.sink_values[..., :new_len, :]

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.sink_keys = self.sink_keys.index_select(0, index)
        self.sink_values = self.sink_values.index_select(0, index)
        self.chunks = [c.select_batch(index) for c in self.chunks]
        self._packed = None
        self.batch = int(index.numel())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search: factors are reindexed, never re-compressed."""
        self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._select_batch(indices)

    def offload(self):
        """Offloading compressed layers is not supported; the compressed chunks stay on their device."""

    def prefetch(self):
        """See `offload`."""

    # ---- compression -------------------------------------------------------------------------------------
    def compress_all(self) -> None:
        """Compress every exact token except the sinks, including a final partial chunk."""
        _age_layers([self], final=True)

    def _fill_sinks(self) -> bool:
        """Move the first exact tokens into the sink region (they stay exact for good); True once it is full."""
        need = self.sink_region - self.sink_length
        if need > 0 and self.tail_length > 0:
            take = min(need, self.tail_length)
            self.sink_keys = torch.cat([self.sink_keys, self.keys[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, self.values[..., :take, :]], dim=-2)
            # clone: a view would keep the whole incoming buffer alive behind the few tokens it shows.
            self.keys = self.keys[..., take:, :].clone()
            self.values = self.values[..., take:, :].clone()
        return self.sink_length >= self.sink_region

    def _chunk_sizes(self, final: bool) -> list[int]:
        """Lengths of the chunks to compress now, oldest first."""
        cfg = self.config
        avail = self.tail_length - (0 if final else cfg.residual_length)
        c = cfg.chunk_size
        if avail <= 0 or (avail < c and not final):
            return []
        if not cfg.dynamic_chunking:
            n = avail // c
            sizes = [c] * n
            if final and avail - n * c > 0:
                # (Measured: joining a remainder under half a chunk to the last chunk saves a factorisation
                # but cost quality at 0.125: pooled perplexity +1.91% instead of +1.70%.)
                sizes.append(avail - n * c)
            return sizes
        # Dynamic: longer sequences get longer chunks (the basis cost is spread over more tokens), and a span
        # is split into near-equal chunks instead of leaving a short remainder.
        target = 2 * c if self.get_seq_length() >= 32 * c else c
        n = max(1, round(avail / target)) if final else max(1, avail // target)
        span = (
            avail if final else min(avail, n * target + (avail - n * target if avail - n * target < c else 0))
        )
        base, extra = divmod(span, n)
        return [base + 1] * extra + [base] * (n - extra)

    def _compress(self, sizes: list[int]) -> None:
        """Factor the oldest ``sum(sizes)`` tail tokens into chunks of those sizes (equal sizes batched)."""
        _compress_layers([(self, sizes)])

    def _prepare(self, sizes: list[int]) -> _Job:
        """The oldest ``sum(sizes)`` tail tokens as a job for :func:`_compress_layers`: float32, keys with their
        rotary embedding undone when so configured."""
        total = sum(sizes)
        start = self.sink_length + self.compressed_length
        keys = self.keys[..., :total, :].to(torch.float32)
        values = self.values[..., :total, :].to(torch.float32)
        # A NaN or inf anywhere makes the sum non-finite: one cheap reduction first, the exact test only then
        # (a sum of huge finite values may overflow).
        if not bool(torch.isfinite(keys.sum() + values.sum())) and not (
            torch.isfinite(keys).all() and torch.isfinite(values).all()
        ):
            raise ValueError(
                f"layer {self.layer_idx}: keys or values contain NaN or inf at cache positions "
                f"{start}..{start + total - 1}; they cannot be compressed (check the model's dtype/inputs)"
            )
        pre_rope = self.config.compress_keys_pre_rope and self.inv_freq is not None
        if pre_rope:
            keys = rotate_range(keys, start, self.inv_freq, inverse=True)
        return _Job(self, sizes, start, keys, values, pre_rope)

    def _batch_signature(self, length: int) -> tuple:
        """Chunks of layers with equal signatures are factored and encoded in one call. A basis shared across a
        layer's chunks belongs to that layer, so those never join another layer's."""
        own = self.layer_idx if self.config.basis_sharing != "none" else None
        return (length, self.batch, self.heads, self.head_dim, self.v_head_dim, self.device, self._joint, own)

    @property
    def _joint(self) -> bool:
        """Keys and values of equal head size are factored and encoded as one stack (half the calls, each on
        twice the matrices)."""
        return self.config.basis_sharing == "none" and self.head_dim == self.v_head_dim

    def _shares_basis(self, kind: str) -> bool:
        """Whether chunks of ``kind`` ("k"/"v") are coefficients on a basis of the layer (``basis_sharing``)."""
        sharing = self.config.basis_sharing
        return sharing == "layer" or (sharing == "keys" and kind == "k")

    def _allocate(self, job: _Job) -> None:
        """Ranks of the job's chunks, oldest first: each one's byte budget depends on what the earlier ones
        store, which the ranks fix exactly (bytes are linear in the rank), so no factor is encoded before all
        ranks are known."""
        if self.config.basis_sharing != "none":
            self._allocate_shared(job)
            return
        pending_tokens = pending_bytes = 0
        # Energy shares of every unit of a group's chunks, (n_chunks, key groups + value groups, k), on the host
        # once: the allocation is a few hundred scores per chunk, where each device op would cost more.
        shares = {
            s: np.concatenate([fk.energy.cpu().numpy(), fv.energy.cpu().numpy()], axis=1)
            for s, (fk, fv) in job.factored.items()
        }
        stored = self._aged_stored_bytes()
        for i, s in enumerate(job.sizes):
            fk, fv = job.factored[s]
            kinds = ["k"] * fk.groups + ["v"] * fv.groups
            cols = [fk.columns] * fk.groups + [fv.columns] * fv.groups
            r = self._choose_ranks(
                s, shares[s][job.slot[i]], kinds, cols, pending_tokens, pending_bytes, stored
            )
            job.ranks.append(r)
            pending_tokens += s
            pending_bytes += sum(ri * self._rank_cost(s, c) for ri, c in zip(r, cols))

    def _allocate_shared(self, job: _Job) -> None:
        """Ranks with a basis shared by the layer (``basis_sharing``); see :meth:`_shared_units`."""
        cfg = self.config
        units = self._shared_units(job)
        # Before any basis this job stores is counted: the corrections spend what the ranks leave of it.
        job.budget = budget = self._chunk_budget(sum(job.sizes))
        if cfg.adaptive_rank and cfg.use_low_rank_approximation and cfg.target_rank is None:
            ranks = choose_ranks_linear(units.scores, units.per_rank, budget, units.floors)
        else:
            ranks = self._choose_ranks(
                sum(job.sizes),
                units.shares,
                units.kinds,
                units.cols,
                per_rank=units.per_rank,
                caps=units.caps,
            )
        self._apply_shared_ranks(job, ranks, units.owners)

    def _shared_units(self, job: _Job) -> _SharedUnits:
        """The units a job with a shared basis allocates: one per group of a kind on the shared basis, for all
        the job's chunks; one per chunk and group of a kind without (``"keys"``: the values).

        The first span compressed fixes the basis: a component kept costs its token rows in every chunk plus
        its basis row once, so both are counted and the stored basis is cut to the ranks kept (the bytes
        stored are exactly those ranks' bytes). Later chunks pay token rows only and keep at most the rows
        stored. A unit's score is its component shares (each chunk's weighted by its length) times its weight
        (:meth:`_unit_weights`) and its tokens, as in pooled allocation.
        """
        fk, fv = next(iter(job.factored.values()))
        weights = self._unit_weights(fk.groups, fv.groups)
        width = max(fk.columns, fv.columns)
        total = sum(job.sizes)
        units = _SharedUnits()

        def add(kind, cols, share, cap, cost, owner, tokens):
            row = np.zeros(width)
            row[: share.shape[-1]] = share
            score = np.where(np.arange(width) < cap, row * weights[owner[1]] * tokens, -np.inf)
            units.kinds.append(kind)
            units.cols.append(cols)
            units.shares.append(row)
            units.scores.append(score)
            units.caps.append(cap)
            units.per_rank.append(cost)
            units.floors.append(min(cap, math.ceil(self.config.min_rank_ratio * width)))
            units.owners.append(owner)

        for kind, lo in (("k", 0), ("v", fk.groups)):
            parts = [(s, f_k if kind == "k" else f_v) for s, (f_k, f_v) in job.factored.items()]
            f0 = parts[0][1]
            if self._shares_basis(kind):
                share = (
                    sum(s * f.energy.double().sum(0) for s, f in parts).cpu().numpy() / total
                )  # (groups, k)
                rows = [f0.columns] * f0.groups
                if kind in self.shared_bases:
                    rows = [0 if b is None else b.shape[-2] for b in self.shared_bases[kind]]
                cost = sum(self._rank_cost(s, f0.columns, True) for s in job.sizes)
                if kind in self._basis_drafts:
                    cost += self.codec.basis_row_cost(f0.columns)
                for g in range(f0.groups):
                    add(kind, f0.columns, share[g], rows[g], cost, (None, lo + g), total)
                continue
            for s, f in parts:
                energy = f.energy.double().cpu().numpy()  # (n, groups, k)
                for j, i in enumerate(job.by_length[s]):
                    for g in range(f.groups):
                        cost = self._rank_cost(s, f.columns)
                        add(kind, f.columns, energy[j, g], energy.shape[-1], cost, (i, lo + g), s)
        units.shares = np.stack(units.shares)
        units.scores = np.stack(units.scores)
        return units

    def _apply_shared_ranks(self, job: _Job, ranks: list[int], owners: list[tuple[int | None, int]]) -> None:
        """Give the job's chunks their ranks (``owners[u]``: the chunk unit u belongs to, None for all, and its
        position in the chunk's ranks), cut a drafted basis to them, and turn the shared kinds' coefficients
        into coefficients on the stored rows."""
        fk, fv = next(iter(job.factored.values()))
        job.ranks = [[0] * (fk.groups + fv.groups) for _ in job.sizes]
        for r, (i, pos) in zip(ranks, owners):
            for chunk_ranks in job.ranks if i is None else [job.ranks[i]]:
                chunk_ranks[pos] = int(r)
        ranks = job.ranks[0]  # the shared kinds' ranks are every chunk's
        key_groups = fk.groups
        for kind, lo in (("k", 0), ("v", key_groups)):
            if kind in self._basis_drafts:
                drafts = self._basis_drafts.pop(kind)
                kept = ranks[lo : lo + len(drafts)]
                self.shared_bases[kind] = [take_rank(d, r) for d, r in zip(drafts, kept)]
                job.basis_bytes += sum(factor_nbytes(b) for b in self.shared_bases[kind])
                # The frames of the rows kept: q's first r rows, mix's leading r × r block (see _shared_basis).
                q, mix = self._basis_frames[kind]
                r = torch.tensor(kept, device=q.device)
                idx = torch.arange(q.shape[-1], device=q.device)
                rows = idx[None, :] < r[:, None]  # (groups, cols)
                self._basis_frames[kind] = (
                    q * rows[:, :, None],
                    mix * (rows[:, :, None] & rows[:, None, :]),
                )
        for f_k, f_v in job.factored.values():
            for kind, f, lo in (("k", f_k, 0), ("v", f_v, key_groups)):
                if f.mix is None:
                    continue
                # The chunks' channel factors: the stored rows (known now that they are cut).
                f.channel[:] = [
                    SharedRows(b, 0 if b is None else b.shape[-2]) for b in self.shared_bases[kind]
                ]
                # Coefficients on the orthonormal rows, cut to each group's rank, as coefficients on the
                # stored rows (see _shared_basis): x ≈ Σ_{i<r} c_i q_i = Σ_i c_i Σ_{j<=i} mix[j, i] B_j; rows
                # past the rank are zeroed first, so the kept ones depend only on kept ones.
                r = torch.tensor(ranks[lo : lo + f.groups], device=f.token_t.device)
                keep = torch.arange(f.columns, device=r.device)[None, :] < r[:, None]  # (groups, k)
                cut = f.token_t * keep[None, :, None, :, None]
                f.token_t.copy_(torch.einsum("ngbit,gji->ngbjt", cut, f.mix))

    def _add_corrections(self, job: _Job, built: dict[int, CompressedChunk]) -> None:
        """Per-chunk corrections to a shared basis (``basis_corrections``): the bytes the job leaves of its
        budget (the allocation's ``job.budget``, less what the chunks and any basis the job stored take; with
        pooled ranks, at most what the pool left) buy components of each chunk's residual
        ``x - coefficients @ stored rows``, chosen across the job's chunks, kinds and groups by energy per byte
        (weighted as the ranks are) and stored as extra rows of the chunk's channel factor.

        Chunks of the first span rarely have bytes left (the basis was cut to what they keep); later chunks,
        which keep at most the rows stored, have what those rows cannot hold.
        """
        kinds = [kind for kind in ("k", "v") if self._shares_basis(kind)]
        spent = sum(c.keys.nbytes + c.values.nbytes for c in built.values())
        if job.budget is not None:
            # The allocation's budget less what it stored, the basis included. Asking _chunk_budget again would
            # see the new basis only as debt, and debt is capped: after many exact sinks the cap is reached,
            # and the corrections would spend the basis's bytes a second time.
            slack = job.budget - spent - job.basis_bytes
        else:  # pooled ranks: the pool left by the pooled allocation bounds it below
            slack = self._chunk_budget(sum(job.sizes)) - spent
        if job.correction_pool is not None:
            slack = min(slack, job.correction_pool[0])
        fk, fv = next(iter(job.factored.values()))
        weights = self._unit_weights(fk.groups, fv.groups)
        cheapest = min(self._rank_cost(s, f.columns) for s in job.sizes for f in (fk, fv))
        if slack < cheapest:
            return
        units = []  # (length, kind, float token_t (n, g, b, k, T), channel (n, g, b, k, cols))
        rows, costs = [], []
        for s, (f_k, f_v) in job.factored.items():
            xk, xv = job.stack(s)
            for kind, x, f in (("k", xk, f_k), ("v", xv, f_v)):
                if kind not in kinds:
                    continue
                n, b, g, cols = x.shape[0], x.shape[1], f.groups, f.columns
                mats = self._matrices(x).reshape(n, b, g, s, cols)
                # The coefficients are on the stored rows (see _apply_shared_ranks), zero past each rank.
                stored = self._stored_rows(kind, g, cols, x.device)
                resid = mats - torch.einsum("ngbkt,gkc->nbgtc", f.token_t, stored)
                fac = factorize(
                    resid.reshape(n * b * g, s, cols),
                    self.config.factorizer_for(x.device.type),
                    check_finite=False,
                )
                k = fac.spectrum.shape[-1]
                total = mats.double().pow(2).sum((-1, -2)).clamp_min(1e-30)  # (n, b, g)
                share = (fac.spectrum.reshape(n, b, g, k).double() ** 2 / total[..., None]).mean(
                    1
                )  # (n, g, k)
                lo = 0 if kind == "k" else fk.groups
                w = weights[lo : lo + g]
                rows += list((share * torch.as_tensor(w * s)[None, :, None]).reshape(n * g, k).numpy())
                costs += [self._rank_cost(s, cols)] * (n * g)
                token_t = fac.token_factor.reshape(n, b, g, s, k).permute(0, 2, 1, 4, 3)
                channel = fac.channel_factor.reshape(n, b, g, k, cols).permute(0, 2, 1, 3, 4)
                units.append((s, kind, token_t, channel))
        width = max(r.size for r in rows)
        energies = np.full((len(rows), width), -np.inf)
        for u, r in enumerate(rows):
            energies[u, : r.size] = r
        extra = choose_ranks_linear(energies, costs, slack, [0] * len(rows))
        if job.correction_pool is not None:
            job.correction_pool[0] -= float(np.dot(extra, costs))
        at = 0
        for s, kind, token_t, channel in units:
            n, g = token_t.shape[:2]
            ranks = np.asarray(extra[at : at + n * g]).reshape(n, g)
            at += n * g
            top = int(ranks.max())
            if top == 0:
                continue
            tok, chan = self.codec.encode(
                token_t[..., :top, :].contiguous(), channel[..., :top, :].contiguous()
            )
            for j, i in enumerate(job.by_length[s]):
                fs = built[i].keys if kind == "k" else built[i].values
                for gi in range(g):
                    t, c = fs.pairs[gi]
                    r = int(ranks[j, gi])
                    # Copies even without a correction: the job's token buffer is then held by no chunk.
                    if r == 0:
                        fs.pairs[gi] = (None if t is None else take_rank(t, t.shape[-2]), c)
                        continue
                    t_c, c_c = take_rank(tok[j, gi], r), take_rank(chan[j, gi], r)
                    basis = self.shared_bases[kind][gi]
                    fs.pairs[gi] = (cat_rows(t, t_c), SharedRows(basis, 0 if c is None else c.rank, c_c))

    def _stored_rows(self, kind: str, groups: int, cols: int, device: torch.device) -> torch.Tensor:
        """The stored basis of ``kind`` decoded, zero-padded: (groups, cols, cols) float32."""
        out = torch.zeros(groups, cols, cols, device=device)
        for gi, rows in enumerate(self.shared_bases[kind]):
            if rows is not None:
                out[gi, : rows.shape[-2]] = SharedRows(rows, rows.shape[-2]).decode(torch.float32)
        return out

    def _finish(self, job: _Job) -> None:
        """Append the job's chunks, built from its encoded factors, and drop their tokens from the tail."""
        built = {}
        for s, idxs in job.by_length.items():
            built.update(zip(idxs, self._build_chunks(job, s, idxs)))
        if self.config.basis_sharing != "none" and self.config.basis_corrections:
            self._add_corrections(job, built)
        for i, s in enumerate(job.sizes):
            chunk = built[i]
            if self.config.debug:
                k_orig = job.keys[..., job.offsets[i] : job.offsets[i] + s, :]
                v_orig = job.values[..., job.offsets[i] : job.offsets[i] + s, :]
                err_k = relative_error(k_orig, chunk.keys.reconstruct())
                err_v = relative_error(v_orig, chunk.values.reconstruct())
                chunk.info.update(key_error=err_k, value_error=err_v)
                logger.info(
                    "layer %d chunk @%d len %d: key ranks %s value ranks %s, %d bytes, rel. error K %.4f V %.4f",
                    self.layer_idx, chunk.start, s, chunk.keys.ranks, chunk.values.ranks, chunk.nbytes, err_k, err_v,
                )  # fmt: skip
            self.chunks.append(chunk)
            self._packed = None
        # Copies, so the slices do not keep the whole pre-compression buffer alive.
        total = sum(job.sizes)
        self.keys = self.keys[..., total:, :].clone()
        self.values = self.values[..., total:, :].clone()

    def _matrices(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n_chunks, batch, heads, T, d) → (n_chunks * batch * groups, T, columns)."""
        n, b, h, t, d = x.shape
        if self.config.head_mode == "joined":
            return x.permute(0, 1, 3, 2, 4).reshape(n * b, t, h * d)
        return x.reshape(n * b * h, t, d)

    def _factor(self, x: torch.Tensor, kind: str) -> _Factored:
        """Factor a stack of chunks x: (n_chunks, batch, heads, T, d) at full rank, in float32 (not yet encoded)."""
        n, b, h, t, d = x.shape
        g = 1 if self.config.head_mode == "joined" else h
        mats = self._matrices(x)
        cols = mats.shape[-1]
        if self._shares_basis(kind):
            xg = mats.reshape(n, b, g, t, cols)
            basis, mix = self._shared_basis(kind, xg)  # (g, cols, cols) each, see there
            coeffs = torch.einsum("nbgtc,gkc->nbgtk", xg, basis)
            token_t = coeffs.permute(0, 2, 1, 4, 3)
            energy = coeffs.double().pow(2).sum(3)  # (n, b, g, k)
            energy = (energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)).mean(1)
            # Ranks keep a prefix of the basis order: make the shares non-increasing along it.
            energy = energy.flip(-1).cummax(-1).values.flip(-1).float()
            # The channel factors (`SharedRows`) are set by _allocate_shared, once the stored rows are known.
            return _Factored(token_t, [], energy, g, cols, mix=mix)
        method = self.config.factorizer_for(mats.device.type)
        if method == "gram" and cols <= t:
            # Only the basis now: the factors are formed at encoding, for the components some chunk keeps.
            basis = gram_basis(mats)
            token_t, channel, spectrum = None, None, basis.spectrum
        else:
            fac = factorize(mats, method, rank=self.config.target_rank, check_finite=False)
            k = fac.spectrum.shape[-1]
            basis, spectrum = None, fac.spectrum
            token_t = fac.token_factor.reshape(n, b, g, t, k).permute(0, 2, 1, 4, 3)
            channel = fac.channel_factor.reshape(n, b, g, k, cols).permute(0, 2, 1, 3, 4)
        k = spectrum.shape[-1]
        energy = spectrum.reshape(n, b, g, k).permute(0, 2, 1, 3).double() ** 2
        energy = (energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)).mean(2).float()
        return _Factored(token_t, channel, energy, g, cols, basis, (b, t))

    def _encode(self, f: _Factored, top: int) -> tuple:
        """Encode the first ``top`` components of every factor of ``f`` (components are encoded one by one, so
        this equals encoding all and keeping a prefix). Returns (token, channel) as stored, each
        (n_chunks, groups, batch, top, ·), the channel a list of `SharedRows` with a shared basis."""
        top = max(top, 1)
        token_t = f.token_rows(top)
        if isinstance(f.channel, list):
            return self.codec.encode_tokens(token_t), f.channel
        return self.codec.encode(token_t, f.channel_rows(top))

    def _shared_basis(self, kind: str, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's basis for ``kind``, for projecting chunks xg: (n, batch, groups, T, columns).

        Returns ``(q, mix)``, each (groups, columns, columns) float32, zero beyond the rows stored: ``q`` the
        stored rows as decoded (``B``) made orthonormal (Gram-Schmidt: row j of q spans rows 0..j of B), and
        ``mix`` upper triangular with ``q = mix.T @ B``. Coefficients ``c = x @ q.T``, cut to a rank r, become
        ``c @ mix.T`` on the stored rows (:meth:`_allocate_shared`), which rebuild x projected on the first r
        stored rows: quantisation leaves the rows slightly skew, and coefficients taken on skew rows would count
        that error twice.

        On first use the basis is computed from xg, the principal directions of the span, and held as a draft
        (each group's full basis, encoded) until the allocation cuts it; q and mix are computed then, once.
        """
        if kind not in self._basis_frames:
            g, cols = xg.shape[2], xg.shape[-1]
            gram = torch.einsum("nbgtc,nbgtd->gcd", xg.double(), xg.double())
            _, evecs = torch.linalg.eigh(gram)
            rows = evecs.flip(-1).transpose(-1, -2).float().contiguous()
            # Encoded in one call; each group's draft is a view (cut, i.e. copied, by the allocation).
            encoded = self.codec.encode_basis(rows)
            self._basis_drafts[kind] = [encoded[gi] for gi in range(g)]
            decoded = SharedRows(encoded, cols).decode(torch.float64)  # (g, cols, cols)
            # Bᵀ = QR with R's diagonal made positive (each decoded row keeps its stored row's sign):
            # q = Qᵀ = (R⁻¹)ᵀ B, R⁻¹ upper triangular. Gram-Schmidt keeps prefixes, so cutting the basis to k rows
            # cuts q to its first k rows and mix to its leading k × k block (_apply_shared_ranks).
            q_, r_ = torch.linalg.qr(decoded.transpose(-1, -2))
            sign = torch.where(torch.diagonal(r_, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(torch.float64)
            q_, r_ = q_ * sign[:, None, :], r_ * sign[:, :, None]
            eye = torch.eye(cols, dtype=torch.float64, device=xg.device).expand(g, cols, cols)
            mix = torch.linalg.solve_triangular(r_, eye, upper=True)
            self._basis_frames[kind] = (q_.transpose(-1, -2).float(), mix.float())
        q, mix = self._basis_frames[kind]
        return q, mix

    def _chunk_budget(
        self, length: int, pending_tokens: int = 0, pending_bytes: int = 0, stored: int | None = None
    ) -> float:
        """Bytes this chunk may take: its share of the budget, plus credit or minus part of the debt so far.

        ``pending_*``: tokens and bytes of the chunks of the same compression step decided before this one;
        ``stored``: the aged bytes held before that step, when the caller has them (else counted here).
        """
        ref_token = self._token_bytes(self.reference_element_size)
        rho = self.config.compression_ratio
        allowance = rho * ref_token * length
        aged_tokens = self.sink_length + self.compressed_length + pending_tokens
        stored = self._aged_stored_bytes() if stored is None else stored
        balance = rho * ref_token * aged_tokens - stored - pending_bytes
        return allowance + max(balance, -_MAX_REPAYMENT * allowance)

    def _unit_weights(self, key_groups: int, value_groups: int) -> np.ndarray:
        """Weights of the energy shares of this layer's units (key groups, then value groups) in the adaptive
        allocation: ``key_weight`` for keys, times the layer's ``head_weights`` (to ``head_weights_power``) when
        given."""
        w = np.array([self.config.key_weight] * key_groups + [1.0] * value_groups)
        hw = self.config.head_weights
        if hw is not None:
            heads = np.asarray(hw[self.layer_idx][0][:key_groups] + hw[self.layer_idx][1][:value_groups])
            w = w * heads**self.config.head_weights_power
        return w

    def _rank_cost(self, length: int, columns: int, shared: bool = False) -> int:
        """Bytes one component of a (batch, length, columns) unit costs (a token row only when ``shared``: its
        basis row is the layer's)."""
        key = (self.batch, length, columns, shared)
        if key not in self._rank_costs:
            self._rank_costs[key] = self.codec.rank_cost(self.batch, length, columns, shared)
        return self._rank_costs[key]

    def _choose_ranks(
        self,
        length: int,
        energies: np.ndarray,
        kinds: list[str],
        cols: list[int],
        pending_tokens: int = 0,
        pending_bytes: int = 0,
        stored: int | None = None,
        per_rank: list[int] | None = None,
        caps: list[int] | None = None,
    ) -> list[int]:
        """Ranks of the units (key/value × group) of one chunk. energies: (units, k), each row a unit's
        component shares; the rest as for :meth:`_chunk_budget`. ``per_rank``: bytes of one component of each
        unit (default: a token row and a channel row of this chunk); ``caps``: the most components each unit
        may keep (default k)."""
        cfg = self.config
        k = energies.shape[-1]
        capped = caps is not None
        caps = [min(c, k) for c in caps] if capped else [k] * len(kinds)
        if not cfg.use_low_rank_approximation:
            return caps
        if cfg.target_rank is not None:
            return [min(cfg.target_rank, c) for c in caps]
        if per_rank is None:
            per_rank = [self._rank_cost(length, c) for c in cols]
        floors = [min(c, math.ceil(cfg.min_rank_ratio * k)) for c in caps]
        budget = self._chunk_budget(length, pending_tokens, pending_bytes, stored)
        if cfg.adaptive_rank:
            scores = energies * self._unit_weights(kinds.count("k"), kinds.count("v"))[:, None]
            if capped:  # (per-chunk allocation, the common case, has no caps: no masking on that path)
                scores = np.where(np.arange(k)[None, :] < np.asarray(caps)[:, None], scores, -np.inf)
            return choose_ranks_linear(scores, per_rank, budget, floors)
        ranks = []
        for kind, share in (("k", cfg.key_budget_share), ("v", 1.0 - cfg.key_budget_share)):
            idx = [i for i, kd in enumerate(kinds) if kd == kind]
            unit = sum(per_rank[i] for i in idx)
            r = int(budget * share // unit) if unit else k
            ranks += [max(min(r, caps[i]), floors[i]) for i in idx]
        return ranks

    def _build_chunks(self, job: _Job, length: int, idxs: list[int]) -> list[CompressedChunk]:
        """Chunks ``idxs`` of the job (all of ``length``), from its encoded factors of that length: each tensor's
        kept rows of all of them are gathered in one copy (one index per tensor, not per chunk: on a GPU every
        gather and every host-to-device index copy per chunk cost launches and a synchronisation)."""
        (tok_k, chan_k, at_k), (tok_v, chan_v, at_v) = job.encoded[length]
        groups = len(job.ranks[idxs[0]]) // 2
        picks_k = [(at_k + job.slot[i], job.ranks[i][:groups]) for i in idxs]
        picks_v = [(at_v + job.slot[i], job.ranks[i][groups:]) for i in idxs]
        n = len(idxs)

        def take(f_k, f_v) -> tuple[list, list]:
            # Keys and values encoded as one stack are gathered in one copy per tensor.
            if f_k is f_v:
                both = _take_all(f_k, picks_k + picks_v)
                return both[:n], both[n:]
            return _take_all(f_k, picks_k), _take_all(f_v, picks_v)

        def take_channels(chan, picks) -> list:
            # A list: one `SharedRows` per group, the layer's basis (nothing to gather).
            if isinstance(chan, list):
                return [[take_rank(c, r) for c, r in zip(chan, rs)] for _, rs in picks]
            return _take_all(chan, picks)

        tokens = take(tok_k, tok_v)
        if isinstance(chan_k, list) or isinstance(chan_v, list):
            channels = (take_channels(chan_k, picks_k), take_channels(chan_v, picks_v))
        else:
            channels = take(chan_k, chan_v)
        joined = self.config.head_mode == "joined"
        chunks = []
        for m, i in enumerate(idxs):
            sets = [
                FactorSet(list(zip(t[m], c[m])), self.batch, length, self.heads, d, joined)
                for t, c, d in zip(tokens, channels, (self.head_dim, self.v_head_dim))
            ]
            chunks.append(CompressedChunk(job.start + job.offsets[i], length, sets[0], sets[1], job.pre_rope))
        return chunks


# Float32 bytes of tokens that one cross-layer compression call gathers (its transient copy), and that a
# ChunkedSVDCache lets wait exact for it. Measured on SmolLM2 (1,024-token prefill, CPU): compression took 340 ms
# with batches of 4–8 MB, 380 ms with 2 or 16 MB and 460 ms with 64 MB, where the temporaries outgrow the caches;
# one layer at a time took 450 ms. A long prefill of a large model is compressed a layer at a time.
_BATCH_BYTES = 8 << 20


def _age_layers(layers: list[ChunkedSVDLayer], final: bool) -> None:
    """Compress what has aged out of the residual window of each layer (with ``final``, every exact token but
    the sinks). With ``parallel_processing``, the chunks of all the layers are compressed in batched calls of up
    to ``_BATCH_BYTES``; otherwise one chunk at a time."""
    requests = []
    for layer in layers:
        if layer.is_initialized and layer._fill_sinks():
            sizes = layer._chunk_sizes(final)
            if sizes:
                requests.append((layer, sizes))
    if not requests:
        return
    # Small tensors: one thread is faster, and immune to the collapse of threaded kernels on busy cores.
    with single_thread_lapack():
        if not requests[0][0].config.parallel_processing:
            for layer, sizes in requests:
                for size in sizes:
                    _compress_layers([(layer, [size])])
            return
        batch, held = [], 0
        for layer, sizes in requests:
            need = sum(sizes) * layer._token_bytes(4)
            if batch and held + need > _BATCH_BYTES:
                _compress_layers(batch)
                batch, held = [], 0
            batch.append((layer, sizes))
            held += need
        _compress_layers(batch)


@dataclass
class _Job:
    """One layer's share of a compression step: its chunks' tokens, then their factors, ranks and codes.

    keys / values: (batch, kv_heads, sum(sizes), d) float32, keys as factored (rotary embedding undone when
    ``pre_rope``). ``factored`` / ``encoded`` map a chunk length to the (key, value) factors of this job's chunks
    of that length within a stack that may hold other layers' chunks too (each entry carries its offset there).
    """

    layer: ChunkedSVDLayer
    sizes: list[int]
    start: int
    keys: torch.Tensor
    values: torch.Tensor
    pre_rope: bool
    factored: dict = field(default_factory=dict)
    ranks: list = field(default_factory=list)
    encoded: dict = field(default_factory=dict)
    # With pooled ranks: the bytes the pooled allocation left, shared by the jobs of the call ([bytes]), which
    # bounds their corrections to a shared basis (each layer's own slack would overspend the pooled budget).
    correction_pool: list | None = None
    # Per-layer allocation with a shared basis: the bytes the job's chunks may take (measured before the basis
    # they store is counted) and the bytes of that basis.
    budget: float | None = None
    basis_bytes: int = 0

    def __post_init__(self):
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.by_length: dict[int, list[int]] = {}
        for i, s in enumerate(self.sizes):
            self.by_length.setdefault(s, []).append(i)
        # Chunk i is chunk number j of its length group (within this job).
        self.slot = {i: j for idxs in self.by_length.values() for j, i in enumerate(idxs)}

    def stack(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of this job's chunks of ``length``, each (n_chunks, batch, kv_heads, length, d)."""
        idxs = self.by_length[length]
        k = torch.stack([self.keys[..., self.offsets[i] : self.offsets[i] + length, :] for i in idxs])
        v = torch.stack([self.values[..., self.offsets[i] : self.offsets[i] + length, :] for i in idxs])
        return k, v


@torch.no_grad()
def _compress_layers(requests: list[tuple[ChunkedSVDLayer, list[int]]]) -> None:
    """Compress the oldest tail tokens of one or more layers into chunks of the given sizes. Chunks of equal
    length (and layout) are factored in one batched call and encoded in one call across all the layers, while
    ranks are chosen per layer, against that layer's own budget."""
    t0 = time.perf_counter()
    jobs = [layer._prepare(sizes) for layer, sizes in requests]
    groups: dict[tuple, list[tuple[_Job, int]]] = {}
    for job in jobs:
        for length in job.by_length:
            groups.setdefault(job.layer._batch_signature(length), []).append((job, length))
    # Per group: the whole key and value stacks (one object when keys and values were factored as one stack)
    # and where each member's keys and values start in them.
    stacked: dict[tuple, tuple[_Factored, _Factored, list[tuple[int, int]]]] = {}
    for sig, members in groups.items():
        lead = members[0][0].layer
        counts = [len(job.by_length[length]) for job, length in members]
        stacks = [job.stack(length) for job, length in members]
        if lead._joint:
            # Chunk j of a member's keys is entry k_at + j of the stack, its values entry v_at + j.
            fk = fv = lead._factor(torch.cat([t for kv in stacks for t in kv]), "kv")
            starts = [2 * sum(counts[:m]) for m in range(len(members))]
            at = [(s0, s0 + n) for s0, n in zip(starts, counts)]
        else:
            fk = lead._factor(torch.cat([k for k, _ in stacks]), "k")
            fv = lead._factor(torch.cat([v for _, v in stacks]), "v")
            at = [(sum(counts[:m]),) * 2 for m in range(len(members))]
        for (job, length), n, (k_at, v_at) in zip(members, counts, at):
            job.factored[length] = (fk.part(k_at, k_at + n), fv.part(v_at, v_at + n))
        stacked[sig] = (fk, fv, at)
    if jobs[0].layer.config.rank_allocation == "pooled":
        _allocate_pooled(jobs)
    else:
        for job in jobs:
            job.layer._allocate(job)
    # Encode each stack once, cut to the largest rank any of its chunks keeps (components are encoded one by
    # one, so a prefix of a longer encoding equals a shorter one).
    for sig, members in groups.items():
        fk, fv, at = stacked[sig]
        g = fk.groups
        top_k = max(max(job.ranks[i][:g]) for job, length in members for i in job.by_length[length])
        top_v = max(max(job.ranks[i][g:]) for job, length in members for i in job.by_length[length])
        lead = members[0][0].layer
        if fk is fv:
            ek = ev = lead._encode(fk, max(top_k, top_v))
        else:
            ek, ev = lead._encode(fk, top_k), lead._encode(fv, top_v)
        for (job, length), (k_at, v_at) in zip(members, at):
            job.encoded[length] = ((*ek, k_at), (*ev, v_at))
    for job in jobs:
        job.layer._finish(job)
    # Batched work has no per-layer time: each layer is charged an equal share.
    share = (time.perf_counter() - t0) / len(jobs)
    for job in jobs:
        job.layer.compression_seconds += share


def _allocate_pooled(jobs: list[_Job]) -> None:
    """Ranks of every chunk of every job at once (``rank_allocation="pooled"``): one energy-per-byte ranking
    of all their components against the jobs' summed budget, instead of one ranking per chunk and layer.

    A component's score is its share of its unit's (chunk, layer, key/value, head) squared norm, times the
    unit's weight (:meth:`ChunkedSVDLayer._unit_weights`) and the chunk's length (a token counts the same in every
    chunk), divided by its bytes. The budget is the sum of the chunks' allowances plus the jobs' summed balance
    (credit, or at most ``_MAX_REPAYMENT`` of the allowances towards the debt), so the bytes the layers store
    together converge to the budget as each layer's do with ``"per_layer"``.
    """
    rows, costs, floors, owners = [], [], [], []
    shared: dict[int, _SharedUnits] = {}
    allowance = balance = 0.0
    for n, job in enumerate(jobs):
        layer, cfg = job.layer, job.layer.config
        ref_token = layer._token_bytes(layer.reference_element_size)
        allowance += cfg.compression_ratio * ref_token * sum(job.sizes)
        aged = layer.sink_length + layer.compressed_length
        balance += cfg.compression_ratio * ref_token * aged - layer._aged_stored_bytes()
        if cfg.basis_sharing != "none":
            # Units of a shared basis span the job's chunks (see _shared_units).
            shared[n] = units = layer._shared_units(job)
            rows += list(units.scores)
            costs += units.per_rank
            floors += units.floors
            owners.append((n, len(units.owners)))
            continue
        shares = {
            s: np.concatenate([fk.energy.cpu().numpy(), fv.energy.cpu().numpy()], axis=1)
            for s, (fk, fv) in job.factored.items()
        }
        for i, s in enumerate(job.sizes):
            fk, fv = job.factored[s]
            e = shares[s][job.slot[i]].astype(np.float64)
            k = e.shape[-1]
            weights = layer._unit_weights(fk.groups, fv.groups)
            cols = [fk.columns] * fk.groups + [fv.columns] * fv.groups
            rows += list(e * (weights * s)[:, None])
            costs += [layer._rank_cost(s, c) for c in cols]
            floors += [min(k, math.ceil(cfg.min_rank_ratio * k))] * len(cols)
            owners.append((n, len(cols)))
    # Units of short chunks have fewer components: the missing ones score -inf and are never taken.
    energies = np.full((len(rows), max(r.size for r in rows)), -np.inf)
    for u, r in enumerate(rows):
        energies[u, : r.size] = r
    budget = allowance + max(balance, -_MAX_REPAYMENT * allowance)
    ranks = choose_ranks_linear(energies, costs, budget, floors)
    pool = [budget - float(np.dot(ranks, costs))]
    for job in jobs:
        job.correction_pool = pool
    at = 0
    for n, units in owners:
        if n in shared:
            jobs[n].layer._apply_shared_ranks(jobs[n], ranks[at : at + units], shared[n].owners)
        else:
            jobs[n].ranks.append(ranks[at : at + units])
        at += units


def _take_all(f: torch.Tensor | QuantizedTensor, picks: list[tuple[int, list[int]]]) -> list[list]:
    """For each pick ``(j, ranks)``, ``[take_rank(f[j, g], r) for g, r in enumerate(ranks)]``, all in one copy per
    tensor: the kept rows are gathered side by side into one buffer (codes, scales and minima each), and each
    factor is a view of its part, so the buffers hold exactly the kept bytes. f: (n_chunks, groups, batch, k, ·)."""
    quantized = isinstance(f, QuantizedTensor)
    if quantized and f.group_dim % len(f.shape) != len(f.shape) - 1:
        return [[take_rank(f[j, g], r) for g, r in enumerate(ranks)] for j, ranks in picks]
    parts = (f.codes, f.scale, f.minimum) if quantized else (f,)
    groups, batch, k = parts[0].shape[1:4]
    # Row (j, g, b, i) of the stack is kept when i < ranks[g] of pick j.
    index = np.arange(groups * batch * k).reshape(groups, batch, k)
    per_chunk = groups * batch * k
    rows = np.concatenate(
        [
            j * per_chunk + index[np.broadcast_to(np.arange(k) < np.asarray(rs)[:, None, None], index.shape)]
            for j, rs in picks
        ]
    )
    rows = torch.from_numpy(rows).to(parts[0].device)
    ranks = [r for _, rs in picks for r in rs]
    views = []
    for p in parts:  # flatten(0, -2) is a view even when p is a slice along its last dimension
        kept = p.flatten(0, -2).index_select(0, rows).split([batch * r for r in ranks])
        views.append([v.view(batch, r, p.shape[-1]) if r else None for v, r in zip(kept, ranks)])
    if quantized:
        shape = tuple(f.shape[2:-2])
        views = [
            [
                None
                if r == 0
                else QuantizedTensor(
                    c, sc, mn, (*shape, r, f.shape[-1]), f.bits, f.group_size, f.group_dim, f.dtype
                )
                for r, c, sc, mn in zip(ranks, *views)
            ]
        ]
    out, at = [], 0
    for _, rs in picks:
        out.append(views[0][at : at + len(rs)])
        at += len(rs)
    return out


@dataclass
class _SharedUnits:
    """Units of a job with a shared basis (:meth:`ChunkedSVDLayer._shared_units`), one entry each: kind,
    columns, component shares (padded with zeros to the widest), scores (weighted, times tokens, -inf past the
    cap), bytes per component, most and fewest components kept, and owner (chunk index or None for every
    chunk, position in a chunk's ranks)."""

    kinds: list = field(default_factory=list)
    cols: list = field(default_factory=list)
    shares: list | np.ndarray = field(default_factory=list)
    scores: list | np.ndarray = field(default_factory=list)
    per_rank: list = field(default_factory=list)
    caps: list = field(default_factory=list)
    floors: list = field(default_factory=list)
    owners: list = field(default_factory=list)


@dataclass
class _Factored:
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

    def part(self, first: int, last: int) -> _Factored:
        """Chunks ``first … last - 1`` of the stack (views)."""
        if self.basis is not None:
            per_chunk = self.dims[0] * self.groups
            basis = self.basis.rows(first * per_chunk, last * per_chunk)
            return _Factored(None, None, self.energy[first:last], self.groups, self.columns, basis, self.dims)
        channel = self.channel if isinstance(self.channel, list) else self.channel[first:last]
        return _Factored(
            self.token_t[first:last],
            channel,
            self.energy[first:last],
            self.groups,
            self.columns,
            mix=self.mix,
        )


class ChunkedSVDCache(Cache):
    """A `Cache` of `ChunkedSVDLayer` for full-attention layers; sliding-window layers keep transformers' own
    `DynamicSlidingWindowLayer` (they already bound their memory).

    Build it with :meth:`from_model` (reads the layer types and the rotary embedding), or with ``num_layers``
    for a model-agnostic cache without rotary handling.
    """

    def __init__(
        self,
        config: CompressionConfig | None = None,
        num_layers: int | None = None,
        inv_freq: torch.Tensor | None = None,
        layer_types: list[str] | None = None,
        sliding_windows: list[int | None] | None = None,
    ):
        self.compression_config = config if config is not None else CompressionConfig()
        if layer_types is None:
            if num_layers is None:
                raise ValueError(
                    "ChunkedSVDCache needs num_layers or layer_types (or use ChunkedSVDCache.from_model)"
                )
            layer_types = ["full_attention"] * num_layers
        sliding_windows = sliding_windows or [None] * len(layer_types)
        weights = self.compression_config.head_weights
        if isinstance(weights, str):
            raise ValueError(
                f"head_weights={weights!r} is resolved against a model: build the cache with "
                "ChunkedSVDCache.from_model(model, config), or give the weights as lists"
            )
        if weights is not None and len(weights) != len(layer_types):
            raise ValueError(
                f"head_weights gives {len(weights)} layers, the model has {len(layer_types)} decoder layers"
            )
        layers = []
        for i, (kind, window) in enumerate(zip(layer_types, sliding_windows)):
            if kind == "full_attention":
                layers.append(ChunkedSVDLayer(self.compression_config, i, inv_freq))
            elif kind in ("sliding_attention", "chunked_attention") and window is not None:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                raise ValueError(
                    f"layer {i} has type {kind!r}: ChunkedSVDCache supports full_attention and sliding_attention layers"
                )
        super().__init__(layers=layers)
        # parallel_processing: layers leave aged tokens exact during a forward pass, and the cache compresses
        # them across layers after the last one (or sooner, past _BATCH_BYTES).
        self._svd_layers = [i for i, layer in enumerate(layers) if isinstance(layer, ChunkedSVDLayer)]
        self._pending: list[int] = []
        if self.compression_config.parallel_processing:
            for i in self._svd_layers:
                self.layers[i].defer_aging = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`Cache.update`; then, with ``parallel_processing``, the chunks that aged out of the residual windows
        of all layers are compressed together once the last layer has been updated."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not (isinstance(layer, ChunkedSVDLayer) and layer.defer_aging):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in self._pending:  # a new pass began before the last layer was reached
            self.flush()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._pending.append(layer_idx)
        held = sum(self.layers[i].tail_length * self.layers[i]._token_bytes(4) for i in self._pending)
        if layer_idx == self._svd_layers[-1] or held > _BATCH_BYTES:
            self.flush()
        return out

    def flush(self) -> None:
        """Compress what has aged out in layers updated since the last compression (a no-op when nothing
        waits). Called by :meth:`update` after the last layer; the exact tokens are valid cache state
        until then, so nothing else needs it first."""
        pending, self._pending = self._pending, []
        _age_layers([self.layers[i] for i in pending], final=False)

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: CompressionConfig | None = None) -> ChunkedSVDCache:
        """A cache for ``model`` (a transformers causal LM): its layer types and rotary frequencies.

        With ``decode_attention="factored"`` this also switches the model to the ``"chunked_decomp"`` attention
        (SDPA for everything but this cache's factored layers); ``ChunkedDecomp.restore`` or
        :func:`~chunked_decomp.attention.restore_attention` switches it back.
        """
        from chunked_decomp.model_utils import decoder_layout, rotary_inv_freq

        if config is not None and isinstance(config.head_weights, str):
            from chunked_decomp.head_weights import resolve_head_weights

            # "auto" or a file, read against this model; the caller's config keeps the string. Joined heads
            # have no per-head units to weigh ("auto" only; a file with joined heads is refused by the config).
            weights = None if config.head_mode != "per_head" else config.head_weights
            config = replace(config, head_weights=resolve_head_weights(weights, model.config))
        if config is not None and config.decode_attention == "factored":
            use_factored_attention(model)
        layer_types, windows = decoder_layout(model)
        return cls(config, inv_freq=rotary_inv_freq(model), layer_types=layer_types, sliding_windows=windows)

    def compress_all(self) -> None:
        """Compress every exact token of every layer except the sinks (e.g. right after a prefill); with
        ``parallel_processing``, the layers' chunks are compressed in batched calls across layers."""
        self._pending = []
        _age_layers([self.layers[i] for i in self._svd_layers], final=True)

    def set_left_padding(self, pad_lengths: list[int]) -> None:
        """Keep the left-padding region exact (it precedes the real attention sinks of each row).

        pad_lengths: number of padding tokens at the start of each batch row. Call before the first update.
        """
        extra = max(pad_lengths, default=0)
        for layer in self.layers:
            if isinstance(layer, ChunkedSVDLayer):
                if layer.get_seq_length() > 0:
                    raise ValueError("set_left_padding must be called before the cache holds tokens")
                layer.sink_region = layer.config.num_sink_tokens + int(extra)

    def memory_stats(self) -> CacheMemoryStats:
        """Bytes held vs. an uncompressed cache, per layer and in total (sliding layers count as exact)."""
        self.flush()
        stats = CacheMemoryStats()
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ChunkedSVDLayer):
                stats.per_layer.append(layer.memory_stats())
            elif layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
                b = _nbytes(layer.keys) + _nbytes(layer.values)
                seq = layer.get_seq_length()
                stored_tokens = layer.keys.shape[-2]
                per_tok = b // max(stored_tokens, 1)
                stats.per_layer.append(
                    LayerMemoryStats(i, seq, stored_tokens, 0, b, 0, per_tok * seq, 0, per_tok * seq, 0)
                )
        return stats

    @property
    def compression_seconds(self) -> float:
        """Wall time spent compressing (factoring and quantising) so far."""
        return sum(getattr(layer, "compression_seconds", 0.0) for layer in self.layers)
