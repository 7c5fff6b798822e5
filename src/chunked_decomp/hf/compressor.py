"""`ChunkedDecomp`: wire the compressed cache into a transformers model, reversibly.

``compress_model`` changes no weight: it puts a thin wrapper over the model's ``forward`` and ``generate`` (as
instance attributes) that hands them a fresh `ChunkedSVDCache` whenever they would otherwise build their own
uncompressed cache. ``restore`` (or leaving the ``applied`` context) deletes those attributes and the model is
exactly as it was. The parameter count is therefore unchanged — what changes is the bytes of the KV cache,
reported by ``memory_report``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from chunked_decomp.config import CompressionConfig
from chunked_decomp.hf.attention import restore_attention
from chunked_decomp.hf.cache import ChunkedSVDCache
from chunked_decomp.hf.models import cache_geometry, cache_kwarg_name, check_decoder_only, text_config

logger = logging.getLogger("chunked_decomp")

_MARK = "_chunked_decomp_state"


def left_padding(attention_mask: torch.Tensor | None) -> list[int]:
    """Leading zeros per row of a (batch, seq) attention mask (left padding); [] without a mask."""
    if attention_mask is None or attention_mask.dim() != 2:
        return []
    return (attention_mask.cumsum(-1) == 0).sum(-1).tolist()


class ChunkedDecomp:
    """Compress the KV cache of a decoder-only transformers model with chunked low-rank factors.

    ``ChunkedDecomp(**options)`` takes the fields of `CompressionConfig` (so a YAML preset dict can be splatted
    in), or ``ChunkedDecomp(config=CompressionConfig(...))``.

    Example::

        cd = ChunkedDecomp(compression_ratio=0.25, chunk_size=64)
        model = cd.compress_model(model)
        out = model.generate(**inputs, max_new_tokens=64)   # uses the compressed cache
        print(cd.memory_report()["ratio"])
        cd.restore(model)
    """

    def __init__(self, config: CompressionConfig | None = None, **options: Any):
        if config is not None and options:
            raise ValueError("pass either config=CompressionConfig(...) or keyword options, not both")
        self.config = config if config is not None else CompressionConfig.from_dict(options)
        self.last_cache: ChunkedSVDCache | None = None
        if self.config.debug:
            logging.getLogger("chunked_decomp").setLevel(logging.INFO)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ChunkedDecomp:
        """Build from a named preset of ``configs/compression_configs.yaml``."""
        return cls(config=CompressionConfig.from_preset(name, **overrides))

    # ---- validation ---------------------------------------------------------------------------------------
    def validate_for(self, model: torch.nn.Module) -> None:
        """Check the options against the model: decoder-only, chunk fits the context, rank fits the head."""
        check_decoder_only(model)
        cfg = text_config(model)
        _, kv_heads, head_dim = cache_geometry(model)
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if max_pos is not None and self.config.chunk_size > max_pos:
            raise ValueError(
                f"chunk_size must be at most the model's context length ({max_pos} tokens), got {self.config.chunk_size}"
            )
        limit = head_dim if self.config.head_mode == "per_head" else kv_heads * head_dim
        if self.config.target_rank is not None and self.config.target_rank > limit:
            raise ValueError(
                f"target_rank must be at most {limit} (the {'head dimension' if limit == head_dim else 'joined width'} "
                f"of this model), got {self.config.target_rank}"
            )

    # ---- caches -------------------------------------------------------------------------------------------
    def make_cache(
        self, model: torch.nn.Module, attention_mask: torch.Tensor | None = None
    ) -> ChunkedSVDCache:
        """A fresh compressed cache for ``model``; left padding in ``attention_mask`` is kept exact."""
        cache = ChunkedSVDCache.from_model(model, self.config)
        pads = left_padding(attention_mask)
        if pads and max(pads) > 0:
            cache.set_left_padding(pads)
        self.last_cache = cache
        return cache

    # ---- wiring -------------------------------------------------------------------------------------------
    def compress_model(self, model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
        """Make ``model.forward(use_cache=True)`` and ``model.generate()`` use the compressed cache.

        Returns the same model object; no weight or parameter changes. Undo with :meth:`restore`.

        tokenizer: the model's. With ``head_weights="auto"`` and no head-weight file shipped for the model, the
        per-head weights are measured on the Python language reference (:mod:`chunked_decomp.hf.calibration`,
        seconds on a CPU). Without a tokenizer, the one saved beside a locally loaded model is used; if there
        is none, heads are weighted uniformly (with a warning).
        """
        self.validate_for(model)
        if _MARK in model.__dict__:
            raise ValueError(
                "this model is already wired to a ChunkedDecomp cache; call restore(model) first"
            )
        self.calibrate_heads(model, tokenizer)
        name = cache_kwarg_name(model)
        forward = model.forward
        generate = model.generate
        params = list(inspect.signature(forward).parameters)
        position = params.index(name) if name in params else None

        def has_cache(args: tuple, kwargs: dict) -> bool:
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                return True
            return position is not None and len(args) > position and args[position] is not None

        @functools.wraps(forward)
        def compressed_forward(*args, **kwargs):
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(text_config(model), "use_cache", True)
            if use_cache and not has_cache(args, kwargs):
                mask = kwargs.get("attention_mask")
                if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
                    mask = args[1]
                kwargs[name] = self.make_cache(model, mask)
            return forward(*args, **kwargs)

        @functools.wraps(generate)
        def compressed_generate(*args, **kwargs):
            if not has_cache((), kwargs):
                mask = kwargs.get("attention_mask")
                kwargs[name] = self.make_cache(model, mask)
            return generate(*args, **kwargs)

        model.forward = compressed_forward
        model.generate = compressed_generate
        model.__dict__[_MARK] = self
        logger.info("ChunkedDecomp wired into %s: %s", type(model).__name__, self.config)
        return model

    def calibrate_heads(self, model: torch.nn.Module, tokenizer: Any = None) -> bool:
        """Measure ``model``'s head weights if ``head_weights="auto"`` needs them (no shipped file matches,
        none measured yet; :func:`chunked_decomp.hf.calibration.ensure_head_weights`). True when caches made
        for this model will use calibrated weights."""
        from chunked_decomp.config.head_weights import AUTO
        from chunked_decomp.hf.calibration import ensure_head_weights

        cfg = self.config
        if cfg.head_weights != AUTO or cfg.head_mode != "per_head" or not cfg.adaptive_rank:
            return False
        return ensure_head_weights(model, tokenizer)

    def restore(self, model: torch.nn.Module) -> torch.nn.Module:
        """Undo :meth:`compress_model`: the model's own forward/generate (and uncompressed cache) come back."""
        for attr in ("forward", "generate", _MARK):
            model.__dict__.pop(attr, None)
        restore_attention(model)
        return model

    @contextmanager
    def applied(self, model: torch.nn.Module, tokenizer: Any = None) -> Iterator[torch.nn.Module]:
        """Context manager: the model uses the compressed cache inside the block, and not after it
        (``tokenizer`` as for :meth:`compress_model`)."""
        self.compress_model(model, tokenizer)
        try:
            yield model
        finally:
            self.restore(model)

    def compress_model_from_name(
        self, name: str = "smollm2-135m", **load_kwargs: Any
    ) -> tuple[torch.nn.Module, Any]:
        """Load ``name`` (the embedded default ``"smollm2-135m"``, a local folder or a hub id) and compress it.

        Returns ``(model, tokenizer)``. ``load_kwargs`` go to `chunked_decomp.hf.loading.load_model_and_tokenizer`
        (``dtype``, ``device``, ``trust_remote_code``, ``cache_dir``).
        """
        from chunked_decomp.hf.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(name, **load_kwargs)
        return self.compress_model(model, tokenizer), tokenizer

    # ---- reporting ----------------------------------------------------------------------------------------
    def memory_report(self, cache: ChunkedSVDCache | None = None) -> dict:
        """Stored KV bytes vs. uncompressed, per layer and in total, for ``cache`` or the last one used."""
        cache = cache if cache is not None else self.last_cache
        if cache is None:
            raise ValueError("no cache yet: run a forward pass or generate() on the compressed model first")
        report = cache.memory_stats().to_dict()
        report["compression_seconds"] = cache.compression_seconds
        return report


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (unchanged by ChunkedDecomp, which compresses the cache, not the weights)."""
    return sum(p.numel() for p in model.parameters())
