"""Peers of ChunkedDecomp behind the :class:`~chunked_decomp.evaluation.methods.KVMethod` interface.

* :class:`QuantizedCacheMethod`: transformers' ``QuantizedCache`` (KIVI-style integer quantisation with a
  full-precision residual window; Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
  Cache").
* :class:`KVPressMethod`: NVIDIA kvpress "presses" that evict tokens at prefill (Knorm, SnapKV, StreamingLLM,
  ExpectedAttention, TOVA, or any press class by name). kvpress pins ``transformers<5.3``; it is imported only
  when such a method is built, and :func:`kvpress_available` says whether it can be.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch
from transformers.cache_utils import Cache

from chunked_decomp.evaluation.methods import (
    REFERENCE_BYTES_PER_VALUE,
    KVMethod,
    StorageStats,
    reference_storage,
    tensor_nbytes,
)

# --------------------------------------------------------------------------------------------------------------
# transformers' QuantizedCache


class QuantizedCacheMethod(KVMethod):
    """transformers' ``QuantizedCache``: keys and values quantised to ``nbits`` integers in groups of
    ``q_group_size`` (quanto: per channel along ``axis``), with the most recent tokens (up to
    ``residual_length``) in full precision.

    At prefill transformers quantises the whole prompt and leaves the residual empty, so the comparison covers
    the whole context; any residual left is counted anyway (at 16 bits, as raw tokens).

    Stored bytes are counted from the real tensors: quanto's packed ``uint8`` data plus its per-group ``scale``
    and ``shift`` (held in the model's dtype: float32 on CPU, which makes 4-bit cost 0.3125 of a 16-bit cache
    with groups of 64 rather than the 0.28 it would cost with 16-bit scales).
    """

    exact_prefill = True  # the first update quantises what it is given and returns it unchanged

    def __init__(
        self,
        nbits: int = 4,
        backend: str = "quanto",
        q_group_size: int = 64,
        residual_length: int = 128,
        axis_key: int = 0,
        axis_value: int = 0,
        name: str | None = None,
    ):
        if backend not in ("quanto", "hqq"):
            raise ValueError(f"backend must be 'quanto' or 'hqq', got {backend!r}")
        if nbits not in (2, 4) and backend == "quanto":
            raise ValueError(f"nbits must be 2 or 4 for the quanto backend, got {nbits}")
        if q_group_size < 1:
            raise ValueError(f"q_group_size must be >= 1, got {q_group_size}")
        if residual_length < 0:
            raise ValueError(f"residual_length must be >= 0, got {residual_length}")
        self.nbits = nbits
        self.backend = backend
        self.q_group_size = q_group_size
        self.residual_length = residual_length
        self.axis_key = axis_key
        self.axis_value = axis_value
        self.name = name or f"{backend}{nbits}"

    def new_cache(self, model: torch.nn.Module) -> Cache:
        from transformers import QuantizedCache

        return QuantizedCache(
            backend=self.backend,
            config=model.config,
            nbits=self.nbits,
            axis_key=self.axis_key,
            axis_value=self.axis_value,
            q_group_size=self.q_group_size,
            residual_length=self.residual_length,
        )

    def storage(
        self, model: torch.nn.Module, cache: Cache, n_tokens: int, batch_size: int = 1
    ) -> StorageStats:
        quantized = residual_stored = residual_held = 0
        for layer in cache.layers:
            quantized += tensor_nbytes(getattr(layer, "_quantized_keys", None))
            quantized += tensor_nbytes(getattr(layer, "_quantized_values", None))
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                    residual_stored += tensor.numel() * REFERENCE_BYTES_PER_VALUE
                    residual_held += tensor_nbytes(tensor)
        reference, cache_dtype = reference_storage(model, n_tokens, batch_size)
        return StorageStats(
            quantized + residual_stored, reference, quantized + residual_held, cache_dtype, n_tokens
        )


# --------------------------------------------------------------------------------------------------------------
# kvpress

#: Short names of the presses compared by default → kvpress class names.
KVPRESS_PRESSES: dict[str, str] = {
    "knorm": "KnormPress",
    "snapkv": "SnapKVPress",
    "streamingllm": "StreamingLLMPress",
    "expectedattention": "ExpectedAttentionPress",
    "tova": "TOVAPress",
}


def kvpress_available() -> bool:
    """Whether kvpress can be imported here (it needs ``transformers<5.3``)."""
    if importlib.util.find_spec("kvpress") is None:
        return False
    try:
        import kvpress  # noqa: F401
    except Exception:  # an installed kvpress that fails against this transformers counts as absent
        return False
    return True


def _press_class(press_name: str) -> type:
    import kvpress

    key = press_name.lower().replace("_", "").replace("-", "")
    if key.endswith("press") and key[: -len("press")] in KVPRESS_PRESSES:
        key = key[: -len("press")]
    class_name = KVPRESS_PRESSES.get(key, press_name)
    try:
        return getattr(kvpress, class_name)
    except AttributeError as err:
        raise ValueError(
            f"unknown kvpress press {press_name!r}; short names: {sorted(KVPRESS_PRESSES)}, or a kvpress class name"
        ) from err


class KVPressMethod(KVMethod):
    """A kvpress press that evicts tokens from the cache at prefill.

    ``compression_ratio`` is ρ, the fraction of tokens **kept** (the meaning it has everywhere in
    ChunkedDecomp); kvpress's own ``compression_ratio`` is the fraction *removed*, so the press is built with
    ``1 - ρ``. Stored bytes are the kept tokens at 16 bits.

    The press hooks are active only during the prefill forward (``with press(model): ...``); the continuation
    then runs on the evicted cache with explicit positions. kvpress compresses only the first forward into an
    empty cache, so streaming through one cache is not supported.
    """

    supports_streaming = False

    def __init__(
        self, press_name: str, compression_ratio: float, name: str | None = None, **press_kwargs: Any
    ):
        if not 0 < compression_ratio <= 1:
            raise ValueError(f"compression_ratio (fraction kept) must be in (0, 1], got {compression_ratio}")
        if not kvpress_available():
            raise ImportError(
                "kvpress is not importable here (it needs transformers<5.3): run scripts/setup_peers_env.sh and "
                "use that environment"
            )
        self.press_name = press_name
        self.compression_ratio = compression_ratio
        self.press = _press_class(press_name)(compression_ratio=1.0 - compression_ratio, **press_kwargs)
        self.name = name or f"kvpress:{press_name.lower()}@{compression_ratio:g}"

    def new_cache(self, model: torch.nn.Module) -> Cache:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def prefill_context(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return self.press(model)
