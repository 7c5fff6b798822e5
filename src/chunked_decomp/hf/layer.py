"""`ChunkedSVDLayer`: one layer of a transformers cache whose older tokens are stored as low-rank factors.

Built in the mould of transformers' `QuantizedLayer(DynamicLayer)`: the most recent tokens stay exact in
``self.keys`` / ``self.values`` (the window); what ages out of it goes to the layer's `LayerStore` (exact sinks,
then chunks of factors), filled by the compression engine (`chunked_decomp.compression.engine`). `update`
returns full-length keys and values (compressed chunks rebuilt, then re-rotated), so every attention
implementation, mask and generation strategy works unchanged; with factored decoding it returns stand-ins that
carry the factors to the ``"chunked_decomp"`` attention instead (`chunked_decomp.hf.attention`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from chunked_decomp.backends import dispatch
from chunked_decomp.backends.context import FactoredContext
from chunked_decomp.compression import engine
from chunked_decomp.compression.plan import CompressionPlan
from chunked_decomp.compression.store import LayerStore, nbytes
from chunked_decomp.core.factors import CompressedChunk
from chunked_decomp.hf.stats import LayerMemoryStats


class ChunkedSVDLayer(DynamicLayer):
    """One layer's cache: exact sinks, low-rank chunks, exact window.

    Args:
        plan: the pieces it compresses with (`CompressionPlan.from_config`).
        layer_idx: index of the layer (head weights, logging and statistics).
        inv_freq: (rotary_dim // 2,) inverse frequencies of the model's rotary embedding, or ``None`` for models
            without one (GPT-2); keys are then factored as they are.
        factored: attend over the factors (``decode_attention="factored"``) instead of rebuilding them.
    """

    is_croppable = True

    def __init__(
        self,
        plan: CompressionPlan,
        layer_idx: int = 0,
        inv_freq: torch.Tensor | None = None,
        factored: bool = False,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.store = LayerStore(plan, layer_idx, inv_freq)
        self.factored = factored
        # Set by ChunkedSVDCache with batched compression: update() leaves aged tokens exact, and the cache
        # compresses the chunks of all its layers together at the end of the forward pass.
        self.defer_aging = False

    # ---- regions ---------------------------------------------------------------------------------------
    @property
    def chunks(self) -> list[CompressedChunk]:
        return self.store.chunks

    @property
    def sink_keys(self) -> torch.Tensor | None:
        return self.store.sink_keys

    @property
    def sink_values(self) -> torch.Tensor | None:
        return self.store.sink_values

    @property
    def sink_length(self) -> int:
        return self.store.sink_length

    @property
    def compressed_length(self) -> int:
        return self.store.compressed_length

    @property
    def tail_length(self) -> int:
        return engine.tail_length(self.keys) if self.is_initialized else 0

    @property
    def compression_seconds(self) -> float:
        """Wall time spent compressing (factoring and quantising) so far."""
        return self.store.compression_seconds

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_length + self.compressed_length + self.tail_length

    def memory_stats(self) -> LayerMemoryStats:
        """Bytes really held by this layer, and the bytes an uncompressed cache would hold."""
        if not self.is_initialized:
            return LayerMemoryStats(self.layer_idx, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        store = self.store
        aged_tokens = self.sink_length + self.compressed_length
        seq = self.get_seq_length()
        elem = torch.empty((), dtype=self.dtype).element_size()
        aged_stored = store.aged_nbytes()
        overhead = store.overhead_nbytes()
        k_ranks = [sum(c.keys.ranks) / max(len(c.keys.ranks), 1) for c in self.chunks]
        v_ranks = [sum(c.values.ranks) / max(len(c.values.ranks), 1) for c in self.chunks]
        return LayerMemoryStats(
            layer_idx=self.layer_idx,
            seq_length=seq,
            exact_tokens=self.sink_length + self.tail_length,
            compressed_tokens=self.compressed_length,
            stored_bytes=aged_stored + overhead + nbytes(self.keys) + nbytes(self.values),
            aged_stored_bytes=aged_stored,
            uncompressed_bytes=seq * store.token_bytes(elem),
            aged_uncompressed_bytes=aged_tokens * store.token_bytes(elem),
            reference_bytes=seq * store.token_bytes(store.reference_element_size),
            aged_reference_bytes=aged_tokens * store.token_bytes(store.reference_element_size),
            mean_key_rank=sum(k_ranks) / len(k_ranks) if k_ranks else 0.0,
            mean_value_rank=sum(v_ranks) / len(v_ranks) if v_ranks else 0.0,
            overhead_bytes=overhead,
        )

    # ---- the transformers layer interface ----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self.store.initialize(key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(batch, kv_heads, q_len, head_dim)`` states; return the full keys and values.

        The returned tensors hold every cached token (compressed chunks rebuilt) followed by the new ones exactly;
        chunks that age out of the window are compressed afterwards, for the next call.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.store.batch:
            raise ValueError(
                f"layer {self.layer_idx}: batch size changed from {self.store.batch} to {key_states.shape[0]} "
                "without batch_select_indices / batch_repeat_interleave"
            )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.factored and self.chunks:
            keys_out, values_out = self.factored_context().handles()
        else:
            keys_out, values_out = self.full_states()
        if not self.defer_aging:
            self.age(final=False)
        return keys_out, values_out

    def full_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every cached token, (batch, kv_heads, seq, d): sinks, chunks rebuilt, window."""
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
        return dispatch.rebuild(self.store)

    def factored_context(self) -> FactoredContext:
        """This layer's states for the factored attention (`chunked_decomp.backends.dispatch.layer_context`)."""
        return dispatch.layer_context(self.store, self.keys, self.values)

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
        self.store.reset()

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
        # Copies: a slice would keep the whole window buffer alive behind the tokens it shows.
        kept = max(new_len - tail_start, 0)
        self.keys = self.keys[..., :kept, :].clone()
        self.values = self.values[..., :kept, :].clone()
        if new_len < tail_start:
            self.store.crop(new_len)

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.store.select_batch(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search: factors are reindexed, never re-compressed."""
        self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.store.batch, device=self.device).repeat_interleave(repeats))

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
    def age(self, final: bool = False) -> None:
        """Compress what has aged out of the window (with ``final``, every exact token but the sinks)."""
        age_layers([self], final)

    def compress_all(self) -> None:
        """Compress every exact token except the sinks, including a final partial chunk."""
        self.age(final=True)

    def drop_oldest(self, n: int) -> None:
        """Drop the ``n`` oldest window tokens (the store now holds them)."""
        if n:
            # Copies, so the slices do not keep the whole buffer alive.
            self.keys = self.keys[..., n:, :].clone()
            self.values = self.values[..., n:, :].clone()


def age_layers(layers: list[ChunkedSVDLayer], final: bool) -> None:
    """Compress what has aged out of each layer's window (batched across them, as their plan says)."""
    consumed = engine.age([(layer.store, layer.keys, layer.values) for layer in layers], final)
    for layer, n in zip(layers, consumed):
        layer.drop_oldest(n)
