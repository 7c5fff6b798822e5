"""`ChunkedSVDCache`: a transformers `Cache` of `ChunkedSVDLayer` for full-attention layers.

With batched compression (``parallel_processing``, the default) the layers let their aged chunks wait exact until
the last layer of the forward pass, then the chunks of all layers are compressed in batched calls.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from chunked_decomp.backends import cpu_kernel
from chunked_decomp.compression import engine
from chunked_decomp.compression.plan import CompressionPlan
from chunked_decomp.compression.store import nbytes
from chunked_decomp.config import CompressionConfig
from chunked_decomp.hf.attention import factored_attention_blocker, use_factored_attention
from chunked_decomp.hf.layer import ChunkedSVDLayer, age_layers
from chunked_decomp.hf.stats import CacheMemoryStats, LayerMemoryStats

logger = logging.getLogger("chunked_decomp")
_SAID = "_chunked_decomp_rebuild_said"


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
        inv_freq: torch.Tensor | list[torch.Tensor | None] | None = None,
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
        plan = CompressionPlan.from_config(self.compression_config)
        weights = self.compression_config.head_weights
        if weights is not None and len(weights) != len(layer_types):
            raise ValueError(
                f"head_weights gives {len(weights)} layers, the model has {len(layer_types)} decoder layers"
            )
        factored = self.compression_config.decode_attention == "factored"
        inv_freqs = inv_freq if isinstance(inv_freq, (list, tuple)) else [inv_freq] * len(layer_types)
        if len(inv_freqs) != len(layer_types):
            raise ValueError(
                f"inv_freq gives {len(inv_freqs)} layers' frequencies, the cache has {len(layer_types)}"
            )
        layers = []
        for i, (kind, window) in enumerate(zip(layer_types, sliding_windows)):
            if kind == "full_attention":
                layers.append(ChunkedSVDLayer(plan, i, inv_freqs[i], factored))
            elif kind in ("sliding_attention", "chunked_attention") and window is not None:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                raise ValueError(
                    f"layer {i} has type {kind!r}: ChunkedSVDCache supports full_attention and sliding_attention layers"
                )
        super().__init__(layers=layers)
        self._svd_layers = [i for i, layer in enumerate(layers) if isinstance(layer, ChunkedSVDLayer)]
        self._pending: list[int] = []
        if plan.batched:
            for i in self._svd_layers:
                self.layers[i].defer_aging = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`Cache.update`; then, with batched compression, the chunks that aged out of the windows of all layers
        are compressed together once the last layer has been updated (or sooner, past ``BATCH_BYTES``)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not (isinstance(layer, ChunkedSVDLayer) and layer.defer_aging):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in self._pending:  # a new pass began before the last layer was reached
            self.flush()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._pending.append(layer_idx)
        held = sum(self.layers[i].tail_length * self.layers[i].store.token_bytes(4) for i in self._pending)
        if layer_idx == self._svd_layers[-1] or held > engine.BATCH_BYTES:
            self.flush()
        return out

    def flush(self) -> None:
        """Compress what has aged out in layers updated since the last compression (a no-op when nothing
        waits). Called by :meth:`update` after the last layer; the exact tokens are valid cache state
        until then, so nothing else needs it first."""
        pending, self._pending = self._pending, []
        age_layers([self.layers[i] for i in pending], final=False)

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: CompressionConfig | None = None) -> ChunkedSVDCache:
        """A cache for ``model`` (a transformers causal LM): its layer types and rotary frequencies.

        ``decode_attention="auto"`` becomes ``"factored"`` where the model's attention allows it, else ``"rebuild"``
        with one info line saying why. With ``"factored"`` this also switches the model to the ``"chunked_decomp"`` attention
        (SDPA for everything but this cache's factored layers); ``ChunkedDecomp.restore`` or
        :func:`~chunked_decomp.hf.attention.restore_attention` switches it back.
        """
        from chunked_decomp.hf.models import decoder_layout, layer_inv_freqs

        if config is not None and isinstance(config.head_weights, str):
            from chunked_decomp.config.head_weights import resolve_head_weights

            # "auto" or a file, read against this model; the caller's config keeps the string. Joined heads
            # have no per-head units to weigh ("auto" only; a file with joined heads is refused by the config).
            from chunked_decomp.hf.calibration import calibrated_weights

            weights = None if config.head_mode != "per_head" else config.head_weights
            measured = calibrated_weights(model)
            config = replace(config, head_weights=resolve_head_weights(weights, model.config, measured))
        if config is not None and config.decode_attention == "auto":
            config = replace(config, decode_attention=_decode_attention_for(model))
        if config is not None and config.decode_attention == "factored":
            use_factored_attention(model)
        layer_types, windows = decoder_layout(model)
        inv_freqs = (
            layer_inv_freqs(model, layer_types) if config is None or config.compress_keys_pre_rope else None
        )
        return cls(config, inv_freq=inv_freqs, layer_types=layer_types, sliding_windows=windows)

    def compress_all(self) -> None:
        """Compress every exact token of every layer except the sinks (e.g. right after a prefill), batched
        across layers."""
        self._pending = []
        age_layers([self.layers[i] for i in self._svd_layers], final=True)

    def set_left_padding(self, pad_lengths: list[int]) -> None:
        """Keep the left-padding region exact (it precedes the real attention sinks of each row).

        pad_lengths: number of padding tokens at the start of each batch row. Call before the first update.
        """
        extra = max(pad_lengths, default=0)
        for layer in self.layers:
            if isinstance(layer, ChunkedSVDLayer):
                if layer.get_seq_length() > 0:
                    raise ValueError("set_left_padding must be called before the cache holds tokens")
                layer.store.sink_region = layer.store.plan.sink_tokens + int(extra)

    def memory_stats(self) -> CacheMemoryStats:
        """Bytes held vs. an uncompressed cache, per layer and in total (sliding layers count as exact)."""
        self.flush()
        # The rotary frequencies: one tensor for every layer, counted once.
        shared = {id(f): f for i in self._svd_layers if (f := self.layers[i].store.inv_freq) is not None}
        stats = CacheMemoryStats(shared_bytes=sum(nbytes(t) for t in shared.values()))
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ChunkedSVDLayer):
                stats.per_layer.append(layer.memory_stats())
            elif layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
                b = nbytes(layer.keys) + nbytes(layer.values)
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


def _decode_attention_for(model: torch.nn.Module) -> str:
    """``decode_attention="auto"`` for ``model``: ``"factored"`` on a CPU where its attention allows it, else
    ``"rebuild"``, said once per model. On a GPU the Triton attention over the factors is still slower than SDPA
    over rebuilt states (docs/results.md), so it stays an explicit choice there."""
    param = next(model.parameters(), None)
    on_cpu = param is None or param.device.type == "cpu"
    reason = factored_attention_blocker(model) if on_cpu else "on a GPU, SDPA over rebuilt chunks is faster"
    if reason is None and not cpu_kernel.available():  # builds it once; its PyTorch path is no faster
        reason = "the fused CPU kernel is unavailable (no compiler or ninja, or CHUNKED_DECOMP_KERNELS=0)"
    if reason is None:
        return "factored"
    if not model.__dict__.get(_SAID):
        model.__dict__[_SAID] = True
        logger.info(
            "decode_attention='auto': %s rebuilds compressed chunks each step (%s)",
            type(model).__name__,
            reason,
        )
    return "rebuild"
