"""Ways to hold the KV cache of a context, behind one interface, so that every method runs through the same
evaluation protocols at equal stored bytes.

A :class:`KVMethod` prefills a context into its cache (compressing it the way the method does) and reports what
it stores. The protocols in :mod:`chunked_decomp.evaluation.perplexity` and
:mod:`chunked_decomp.evaluation.passkey` then continue from that cache with explicit ``position_ids``, so a
method that drops tokens (kvpress) keeps the positions of the tokens that follow.

Byte accounting (the literature's convention, which these protocols compare on):

* ``reference_bytes``: the same tokens in an uncompressed cache at 16 bits per value.
* ``stored_bytes``: what the method keeps for the context *as deployed on a 16-bit model*: raw key/value tokens
  (a full cache, kvpress's kept tokens, a quantised cache's residual window) count at 16 bits; quantised or
  factorised payloads count from their real tensors (packed integers, scales and zero points as held).
* ``cache_bytes`` / ``cache_dtype_bytes``: what this process really holds, and the uncompressed cache in the
  model's own dtype (float32 on CPU). Their ratio is reported too.

The peers (transformers' ``QuantizedCache``, kvpress presses) live in :mod:`chunked_decomp.evaluation.peers`.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from chunked_decomp.hf.models import cache_kwarg_name, output_cache

if TYPE_CHECKING:
    from chunked_decomp.config import CompressionConfig

REFERENCE_BYTES_PER_VALUE = 2  # a 16-bit (float16 / bfloat16) cache


@dataclass(frozen=True)
class StorageStats:
    """What a method holds for ``n_tokens`` context tokens (see the module docstring for the conventions).

    stored_bytes: bytes as deployed on a 16-bit model (raw tokens at 16 bits, quantised payloads as held).
    reference_bytes: the same tokens in an uncompressed 16-bit cache.
    cache_bytes: bytes really held by this process's cache tensors.
    cache_dtype_bytes: the same tokens in an uncompressed cache of the model's dtype.
    """

    stored_bytes: int
    reference_bytes: int
    cache_bytes: int
    cache_dtype_bytes: int
    n_tokens: int

    @property
    def ratio(self) -> float:
        """ρ: stored bytes ÷ uncompressed 16-bit bytes (the budget the literature quotes)."""
        return self.stored_bytes / self.reference_bytes if self.reference_bytes else float("nan")

    @property
    def ratio_cache_dtype(self) -> float:
        """Bytes really held ÷ an uncompressed cache in the model's own dtype."""
        return self.cache_bytes / self.cache_dtype_bytes if self.cache_dtype_bytes else float("nan")


@dataclass
class PrefilledContext:
    """A context prefilled into a method's cache.

    cache: the cache to pass to the next forward.
    last_logits: ``(batch, vocab)`` float logits at the last context token (they predict the first continuation
        token; computed while the context was still exact, as every method here does at prefill).
    context_length: number of context tokens; the positions of the continuation start here (pass explicit
        ``position_ids``, since an eviction cache holds fewer entries than that).
    storage: byte accounting of the context in the cache.
    """

    cache: Cache
    last_logits: torch.Tensor
    context_length: int
    storage: StorageStats

    @property
    def stored_bytes(self) -> int:
        return self.storage.stored_bytes

    @property
    def reference_bytes(self) -> int:
        return self.storage.reference_bytes

    @property
    def ratio(self) -> float:
        return self.storage.ratio


# --------------------------------------------------------------------------------------------------------------
# Byte counting


def tensor_nbytes(obj: Any) -> int:
    """Bytes of the storage behind ``obj``.

    Follows tensor subclasses through ``__tensor_flatten__`` (optimum-quanto's ``WeightQBitsTensor`` holds a
    ``PackedTensor`` of uint8 plus ``_scale`` and ``_shift``; the packed tensor's logical ``uint8`` shape is
    larger than its storage) and walks tuples, lists and dicts (hqq keeps ``(tensor, meta)``).
    """
    if obj is None:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(tensor_nbytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_nbytes(item) for item in obj.values())
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_nbytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    return 0


@dataclass(frozen=True)
class KVGeometry:
    """Shape of a decoder's KV cache: ``num_layers`` layers of keys and values, each
    ``(batch, num_kv_heads, seq_len, head_dim)``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, bytes_per_value: int | float) -> int:
        """Bytes of one token's keys and values over all layers."""
        return int(2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value)


def kv_geometry(model: torch.nn.Module) -> KVGeometry:
    """The KV cache geometry of a Hugging Face causal LM, read from its (text) config."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    num_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return KVGeometry(config.num_hidden_layers, kv_heads, head_dim)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def reference_storage(model: torch.nn.Module, n_tokens: int, batch_size: int = 1) -> tuple[int, int]:
    """``(reference_bytes, cache_dtype_bytes)``: ``n_tokens`` tokens uncompressed at 16 bits and in the model's
    dtype."""
    geometry = kv_geometry(model)
    itemsize = torch.empty((), dtype=model_dtype(model)).element_size()
    per_seq = n_tokens * batch_size
    return (
        per_seq * geometry.bytes_per_token(REFERENCE_BYTES_PER_VALUE),
        per_seq * geometry.bytes_per_token(itemsize),
    )


def raw_kv_storage(model: torch.nn.Module, cache: Cache, n_tokens: int, batch_size: int = 1) -> StorageStats:
    """Storage of a cache whose layers hold raw ``keys`` / ``values`` tensors (DynamicCache, after eviction or
    not): counted at 16 bits for ``stored_bytes``, as held for ``cache_bytes``."""
    stored = held = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                stored += tensor.numel() * REFERENCE_BYTES_PER_VALUE
                held += tensor_nbytes(tensor)
    reference, cache_dtype = reference_storage(model, n_tokens, batch_size)
    return StorageStats(stored, reference, held, cache_dtype, n_tokens)


# --------------------------------------------------------------------------------------------------------------
# Forward helpers


def forward_with_cache(
    model: torch.nn.Module,
    cache: Cache,
    input_ids: torch.Tensor,
    start_position: int,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Run ``input_ids`` ``(batch, n)`` through ``model`` on top of ``cache`` at positions
    ``start_position .. start_position + n - 1``.

    The new tokens attend to everything in the cache and causally to themselves. Explicit positions matter for
    caches that hold fewer entries than tokens seen (eviction). Returns float32 logits ``(batch, n, vocab)`` (or
    the last ``logits_to_keep`` positions).
    """
    n = input_ids.shape[1]
    position_ids = torch.arange(start_position, start_position + n, device=input_ids.device)
    position_ids = position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **{cache_kwarg_name(model): cache},
    )
    returned = output_cache(out)
    if returned is not None and returned is not cache:
        raise RuntimeError("the model replaced the cache object it was given; the protocol needs it in place")
    return out.logits.float()


# --------------------------------------------------------------------------------------------------------------
# Methods


class KVMethod(ABC):
    """A way to hold the KV cache of a context.

    Subclasses give a fresh cache (:meth:`new_cache`), optionally a context manager active during prefill
    (:meth:`prefill_context`, e.g. kvpress hooks), a step after prefill (:meth:`after_prefill`, e.g. compress
    every token) and the byte accounting (:meth:`storage`).
    """

    name: str = "method"
    #: Whether :func:`~chunked_decomp.evaluation.perplexity.streaming_perplexity` can feed text in blocks
    #: through one cache of this method (kvpress compresses only at the first prefill).
    supports_streaming: bool = True
    #: Whether the prefill forward is the model's own: no :meth:`prefill_context`, and the cache returns the
    #: states it is given at the first update. Such methods can share one prefill forward
    #: (:func:`~chunked_decomp.evaluation.shared_prefill.prefill_together`).
    exact_prefill: bool = False

    @abstractmethod
    def new_cache(self, model: torch.nn.Module) -> Cache:
        """An empty cache of this method for ``model`` (also the one used for streaming)."""

    def prefill_context(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Context active during the prefill forward (none by default)."""
        return contextlib.nullcontext()

    def after_prefill(self, cache: Cache) -> None:  # noqa: B027 - optional hook
        """Called once the context is in ``cache`` (e.g. to compress it all)."""

    def after_block(self, cache: Cache) -> None:  # noqa: B027 - optional hook
        """Called after each block in streaming use (the method's own policy by default)."""

    def storage(
        self, model: torch.nn.Module, cache: Cache, n_tokens: int, batch_size: int = 1
    ) -> StorageStats:
        """Bytes held for ``n_tokens`` tokens per sequence in ``cache``."""
        return raw_kv_storage(model, cache, n_tokens, batch_size)

    @torch.no_grad()
    def prefill(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> PrefilledContext:
        """Prefill ``input_ids`` ``(batch, context_len)`` into a new cache of this method.

        ``attention_mask`` ``(batch, context_len)`` may mark padding; the protocols here use unpadded batch 1.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        cache = self.new_cache(model)
        kwargs: dict[str, Any] = {cache_kwarg_name(model): cache}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with self.prefill_context(model):
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        returned = output_cache(out)
        cache = cache if returned is None else returned
        self.after_prefill(cache)
        n_tokens = input_ids.shape[1]
        return PrefilledContext(
            cache=cache,
            last_logits=out.logits[:, -1].float(),
            context_length=n_tokens,
            storage=self.storage(model, cache, n_tokens, input_ids.shape[0]),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FullCache(KVMethod):
    """The uncompressed baseline: transformers' ``DynamicCache`` (ρ = 1)."""

    name = "full"
    exact_prefill = True

    def new_cache(self, model: torch.nn.Module) -> Cache:
        return DynamicCache(config=model.config)


class ChunkedDecompMethod(KVMethod):
    """ChunkedDecomp: the context is prefilled into a :class:`~chunked_decomp.ChunkedSVDCache` and then every
    exact token except the attention sinks is compressed (``cache.compress_all()``), so the comparison covers the
    whole context, as it does for the peers.

    Bytes come from ``cache.memory_stats().stored_bytes``: everything the cache really holds (factors,
    quantisation scales, and the exact sink tokens in the model's dtype, so on a float32 model the sinks count at
    32 bits: conservative against the 16-bit reference). ``compression_ratio`` budgets that same count.
    """

    exact_prefill = True  # chunks are compressed after the first update has returned its states

    def __init__(self, config: CompressionConfig, name: str | None = None, compress_all: bool = True):
        self.config = config
        self.compress_all = compress_all
        self.name = name or f"chunked@{config.compression_ratio:g}"

    def new_cache(self, model: torch.nn.Module) -> Cache:
        from chunked_decomp.hf.cache import ChunkedSVDCache

        return ChunkedSVDCache.from_model(model, self.config)

    def after_prefill(self, cache: Cache) -> None:
        if self.compress_all:
            cache.compress_all()

    def storage(
        self, model: torch.nn.Module, cache: Cache, n_tokens: int, batch_size: int = 1
    ) -> StorageStats:
        stats = cache.memory_stats()
        reference, cache_dtype = reference_storage(model, n_tokens, batch_size)
        return StorageStats(stats.stored_bytes, reference, stats.stored_bytes, cache_dtype, n_tokens)


# --------------------------------------------------------------------------------------------------------------
# Factory


_SPEC_HELP = (
    "method spec: 'full' | 'chunked[:PRESET][@RATIO][,KEY=VALUE...]' | 'quanto4' / 'quanto2' / 'quanto:BITS' | "
    "'hqq:BITS' | 'kvpress:PRESS@RATIO' (RATIO = fraction kept, relative to a 16-bit cache)"
)


def method_from_spec(spec: str) -> KVMethod:
    """Build a method from a short spec string.

    * ``"full"``
    * ``"chunked"``, ``"chunked:balanced"``, ``"chunked:balanced@0.25"``, ``"chunked@0.125"``: a preset of
      ``configs/compression_configs.yaml`` (``default`` when omitted) with ``compression_ratio`` overridden by
      ``@RATIO`` and budgets counted against a 16-bit cache (``reference_dtype="float16"``);
      ``"chunked:aggressive@0.125,basis_sharing=keys"``: with config fields overridden (each value read as YAML,
      as the benchmarks' ``--set``), named with them, so that each setting is its own method.
    * ``"quanto4"``, ``"quanto2"``, ``"quanto:4"``, ``"hqq:4"``: transformers' ``QuantizedCache``.
    * ``"kvpress:snapkv@0.25"``: a kvpress press keeping 25 % of the tokens.
    """
    spec = spec.strip()
    lower = spec.lower()
    if lower in ("full", "dynamic", "baseline"):
        return FullCache()
    head, *items = lower.split(",")
    match = re.fullmatch(r"chunked(?::([\w\-]+))?(?:@([0-9.]+))?", head.strip())
    if match:
        from chunked_decomp.config.presets import parse_overrides

        preset, ratio = match.group(1), match.group(2)
        items = [i.strip() for i in items]
        try:
            overrides = parse_overrides(items)
        except ValueError as err:
            raise ValueError(f"{_SPEC_HELP}; {spec!r}: each override is KEY=VALUE ({err})") from err
        method = chunked_method(preset, float(ratio) if ratio else None, **overrides)
        if items:
            method.name = ",".join([method.name, *items])
        return method
    match = re.fullmatch(r"(quanto|hqq):?([0-9])", lower)
    if match:
        from chunked_decomp.evaluation.peers import QuantizedCacheMethod

        return QuantizedCacheMethod(nbits=int(match.group(2)), backend=match.group(1))
    match = re.fullmatch(r"kvpress:([\w\-]+)@([0-9.]+)", spec, flags=re.IGNORECASE)
    if match:
        from chunked_decomp.evaluation.peers import KVPressMethod

        return KVPressMethod(match.group(1), float(match.group(2)))
    raise ValueError(f"unknown {_SPEC_HELP}; got {spec!r}")


def chunked_method(
    preset: str | None = None, compression_ratio: float | None = None, **overrides
) -> KVMethod:
    """A :class:`ChunkedDecompMethod` from a preset, with the budget counted against a 16-bit cache."""
    from chunked_decomp.config import CompressionConfig

    config = CompressionConfig.from_preset(preset) if preset else CompressionConfig()
    data = config.to_dict()
    data["reference_dtype"] = "float16"
    if compression_ratio is not None:
        data["compression_ratio"] = compression_ratio
    data.update(overrides)
    config = CompressionConfig.from_dict(data)
    label = f"chunked:{preset}" if preset else "chunked"
    return ChunkedDecompMethod(config, name=f"{label}@{config.compression_ratio:g}")


def iter_methods(specs: list[str]) -> Iterator[KVMethod]:
    for spec in specs:
        yield method_from_spec(spec)
