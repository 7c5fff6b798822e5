"""`LayerStore`: what one layer has aged out of its exact window — exact sinks, compressed chunks, a shared basis.

Layout along the sequence of a layer, all ``(batch, kv_heads, ·, head_dim)``::

    [ sinks (exact) | chunk 0 | chunk 1 | … (factors) | window (exact, held by the cache layer) ]

The store counts every byte it holds (:meth:`aged_nbytes`) and prices what the next chunks may hold against the
plan's budget (:meth:`chunk_budget`); the engine (`chunked_decomp.compression.engine`) fills it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from chunked_decomp.compression.budget import spendable
from chunked_decomp.compression.plan import CompressionPlan
from chunked_decomp.compression.shared_basis import SharedBasis
from chunked_decomp.core.factors import CompressedChunk, FactorCodec
from chunked_decomp.core.packed import PackedFactors
from chunked_decomp.core.rotary import rotate, rotate_range


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class LayerStore:
    """The aged tokens of one layer.

    Args:
        plan: the pieces it compresses with.
        layer_idx: the layer's index (for head weights, logging and statistics).
        inv_freq: (rotary_dim // 2,) inverse frequencies of the layer's rotary embedding, or ``None`` (keys are
            then factored as they are).
    """

    def __init__(self, plan: CompressionPlan, layer_idx: int = 0, inv_freq: torch.Tensor | None = None):
        self.plan = plan
        self.layer_idx = layer_idx
        self.inv_freq = inv_freq
        self.basis = SharedBasis(plan.shared_kinds, plan.corrections) if plan.shared_kinds else None
        self.sink_region = plan.sink_tokens
        self.compression_seconds = 0.0
        self.reset()

    def reset(self) -> None:
        """Drop every aged token (and the geometry: the next tokens may have another batch size)."""
        self.initialized = False
        self.chunks: list[CompressedChunk] = []
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self._packed: tuple | bool | None = None  # None = to build, False = layout not packable
        self._rank_costs: dict[tuple, int] = {}
        # Per kind ("k", "v"): the channel-factor format the layer chose (``basis_bits="auto"``); else the plan's.
        self.codecs: dict[str, FactorCodec] = {}
        if self.basis is not None:
            self.basis.reset()

    def initialize(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take the geometry of the layer's first states, keys (batch, kv_heads, T, d), values (…, d_v)."""
        self.dtype, self.device = keys.dtype, keys.device
        self.batch, self.heads, _, self.head_dim = keys.shape
        self.v_head_dim = values.shape[-1]
        # Empty tensors of their own: a slice of the first states would keep their whole buffer alive.
        self.sink_keys = keys.new_empty(self.batch, self.heads, 0, self.head_dim)
        self.sink_values = values.new_empty(self.batch, self.heads, 0, self.v_head_dim)
        ref = self.plan.reference_dtype
        self.reference_element_size = (ref or self.dtype).itemsize
        hw = self.plan.weights.head_weights
        if hw is not None and len(hw[0][0]) != self.heads:
            raise ValueError(
                f"head_weights gives {len(hw[0][0])} weights per layer and kind, layer {self.layer_idx} has "
                f"{self.heads} KV heads"
            )
        self.initialized = True

    # ---- regions -------------------------------------------------------------------------------------------
    @property
    def sink_length(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[-2]

    @property
    def compressed_length(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def sinks_full(self) -> bool:
        return self.sink_length >= self.sink_region

    @property
    def pre_rope(self) -> bool:
        """Whether keys are factored before the rotary embedding (planned, and the layer has one)."""
        return self.plan.keys_pre_rope and self.inv_freq is not None

    @property
    def joint(self) -> bool:
        """Keys and values of equal head size are factored and encoded as one stack (half the calls, each on
        twice the matrices)."""
        return self.basis is None and self.head_dim == self.v_head_dim

    def fill_sinks(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Move the oldest of the window's tokens ``keys`` / ``values`` (batch, kv_heads, L, d) into the sinks,
        up to the sink region (they stay exact for good); returns how many it took."""
        need = self.sink_region - self.sink_length
        tail = 0 if keys.numel() == 0 else keys.shape[-2]
        if need <= 0 or tail == 0:
            return 0
        take = min(need, tail)
        self.sink_keys = torch.cat([self.sink_keys, keys[..., :take, :]], dim=-2)
        self.sink_values = torch.cat([self.sink_values, values[..., :take, :]], dim=-2)
        return take

    def append(self, chunks: list[CompressedChunk]) -> None:
        self.chunks.extend(chunks)
        self._packed = None

    def crop(self, length: int) -> None:
        """Keep the first ``length`` aged tokens (at most the aged length)."""
        kept = []
        for c in self.chunks:
            if c.start + c.length <= length:
                kept.append(c)
            elif c.start < length:
                kept.append(c.crop(length - c.start))
        if len(kept) < len(self.chunks) or (kept and kept[-1] is not self.chunks[len(kept) - 1]):
            # Kept factors may be views of buffers (a compression step's, a packed rebuild's) that also hold the
            # dropped ones: copied, they hold only their own bytes.
            kept = [c.copied() for c in kept]
        self.chunks = kept
        self._packed = None
        if length < self.sink_length:
            # Copies: a slice would keep the whole sink buffer alive.
            self.sink_keys = self.sink_keys[..., :length, :].clone()
            self.sink_values = self.sink_values[..., :length, :].clone()

    def select_batch(self, index: torch.Tensor) -> None:
        """Rows ``index`` of the batch (beam reordering, batch selection, repeat-interleave): factors are
        reindexed, never re-compressed; a shared basis belongs to every row."""
        self.sink_keys = self.sink_keys.index_select(0, index)
        self.sink_values = self.sink_values.index_select(0, index)
        self.chunks = [c.select_batch(index) for c in self.chunks]
        self._packed = None
        self.batch = int(index.numel())

    # ---- bytes and budget ---------------------------------------------------------------------------------
    def token_bytes(self, element_size: int) -> int:
        """Bytes of one token (keys + values, whole batch) in an uncompressed cache of that element size."""
        return self.batch * self.heads * (self.head_dim + self.v_head_dim) * element_size

    def overhead_nbytes(self) -> int:
        """Bytes held besides the aged tokens' own: the tables of the packed factors, when built."""
        packed = self._packed or ()
        return sum(p.overhead_nbytes for p in packed)

    def aged_nbytes(self) -> int:
        """Bytes held: the exact sinks, the shared basis and every chunk's factors."""
        basis = 0 if self.basis is None else self.basis.nbytes
        return nbytes(self.sink_keys) + nbytes(self.sink_values) + basis + sum(c.nbytes for c in self.chunks)

    def chunk_budget(
        self, length: int, pending_tokens: int = 0, pending_bytes: int = 0, stored: int | None = None
    ) -> float:
        """Bytes the next ``length`` tokens may take (`chunked_decomp.compression.budget`). ``pending_*``: tokens
        and bytes of the chunks of the same step decided before them; ``stored``: the aged bytes held before that
        step, when the caller has them (else counted here)."""
        ref_token = self.token_bytes(self.reference_element_size)
        allowance = self.plan.budget.allowance(ref_token, length)
        aged_tokens = self.sink_length + self.compressed_length + pending_tokens
        stored = self.aged_nbytes() if stored is None else stored
        balance = self.plan.budget.allowance(ref_token, aged_tokens) - stored - pending_bytes
        return spendable(allowance, balance)

    def unit_weights(self, key_groups: int, value_groups: int) -> np.ndarray:
        return self.plan.weights.of(self.layer_idx, key_groups, value_groups)

    def codec(self, kind: str) -> FactorCodec:
        """How the factors of ``kind`` ("k", "v") are stored: the format the layer chose, else the plan's."""
        return self.codecs.get(kind, self.plan.codec)

    @property
    def chooses_codecs(self) -> bool:
        """Whether the next compression step chooses the channel formats (``basis_bits="auto"``, first step)."""
        return bool(self.plan.codec_choices) and not self.codecs

    def rank_cost(self, length: int, columns: int, shared: bool = False, kind: str = "k") -> int:
        """Bytes one component of a (batch, length, columns) unit of ``kind`` costs (a token row only when
        ``shared``: its basis row is the layer's)."""
        codec = self.codec(kind)
        key = (self.batch, length, columns, shared, codec)
        if key not in self._rank_costs:
            self._rank_costs[key] = codec.rank_cost(self.batch, length, columns, shared)
        return self._rank_costs[key]

    def signature(self, length: int) -> tuple:
        """Chunks of stores with equal signatures are factored and encoded in one call. A basis shared across a
        layer's chunks belongs to that layer, so those never join another layer's."""
        own = self.layer_idx if self.basis is not None else None
        codecs = (self.codecs.get("k"), self.codecs.get("v"))
        return (
            length,
            self.batch,
            self.heads,
            self.head_dim,
            self.v_head_dim,
            self.device,
            self.joint,
            own,
            codecs,
        )

    # ---- rebuilding ---------------------------------------------------------------------------------------
    def packed(self) -> tuple[PackedFactors, PackedFactors] | None:
        """The chunks' factors packed for a batched rebuild (built when the chunks changed), or None where their
        layout is not one `PackedFactors` handles."""
        if self._packed is None:
            k_sets, v_sets = [c.keys for c in self.chunks], [c.values for c in self.chunks]
            if PackedFactors.supports(k_sets) and PackedFactors.supports(v_sets):
                self._packed = (PackedFactors(k_sets), PackedFactors(v_sets))
            else:
                self._packed = False
        return self._packed or None

    def reconstruct(self, dequant_into: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of all chunks, (batch, kv_heads, compressed_length, d), the layer's dtype, keys in the
        model's rotary frame. ``dequant_into``: a fused dequantiser for packed rows (a backend's), or None."""
        packed = self.packed()
        if packed is not None:
            keys = packed[0].reconstruct(dequant_into)
            values = packed[1].reconstruct(dequant_into).to(self.dtype)
        else:
            keys = torch.cat([c.keys.reconstruct(torch.float32, self.device) for c in self.chunks], dim=-2)
            values = torch.cat([c.values.reconstruct(self.dtype, self.device) for c in self.chunks], dim=-2)
        return self.rotate_back(keys).to(self.dtype), values

    def rotate_back(self, keys: torch.Tensor) -> torch.Tensor:
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
