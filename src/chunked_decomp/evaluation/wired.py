"""A model wired to a compressed cache by :meth:`ChunkedDecomp.compress_model`, measured through its own forward.

The wrapper installed by ``compress_model`` hands the forward a fresh `ChunkedSVDCache`, so what is measured here
reads the compressed chunks: which `ChunkedDecomp` a model is wired to, the same model run unwired for a
baseline, a timed prefill, timed greedy decoding on top of a cache, and the cache's own statistics.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from chunked_decomp.evaluation.methods import forward_with_cache
from chunked_decomp.hf.models import output_cache

if TYPE_CHECKING:
    from chunked_decomp.hf.compressor import ChunkedDecomp

__all__ = ["cache_stats", "decode_speed", "prefill", "uncompressed", "wired_decomp"]


def wired_decomp(model: torch.nn.Module) -> ChunkedDecomp | None:
    """The `ChunkedDecomp` whose compressed cache ``model`` is wired to, or ``None`` for a plain model."""
    from chunked_decomp.hf.compressor import _MARK

    return model.__dict__.get(_MARK)


@contextlib.contextmanager
def uncompressed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block ``model`` runs with its own uncompressed cache; its wiring (if any) comes back after."""
    decomp = wired_decomp(model)
    if decomp is None:
        yield model
        return
    decomp.restore(model)
    try:
        yield model
    finally:
        decomp.compress_model(model)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: torch.nn.Module, context: torch.Tensor, compress: bool) -> tuple[Any, torch.Tensor, float]:
    """Prefill ``context`` ``(batch, n)`` through ``model``'s own forward, letting it build its cache.

    A wired model builds a `ChunkedSVDCache`; with ``compress`` its every exact token but the sinks is then
    compressed. Returns ``(cache, last_logits (batch, vocab) float32, seconds)``.
    """
    device = _device(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=context.to(device), use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no cache from forward(use_cache=True)")
    if compress and hasattr(cache, "compress_all"):
        cache.compress_all()
    _sync(device)
    return cache, out.logits[:, -1].float(), time.perf_counter() - t0


@torch.no_grad()
def decode_speed(
    model: torch.nn.Module, cache: Any, last_logits: torch.Tensor, start_position: int, steps: int
) -> dict[str, float]:
    """Greedy decoding of ``steps`` tokens, one per forward, on top of ``cache`` (which grows by ``steps``).

    last_logits: ``(batch, vocab)`` logits predicting the first new token. Returns ``tokens_per_s`` (batch
    tokens per second from the median step time, robust to a slow first step) and ``median_step_s``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = _device(model)
    token = last_logits.argmax(dim=-1, keepdim=True).to(device)  # (batch, 1)
    times = []
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        logits = forward_with_cache(model, cache, token, start_position + i, logits_to_keep=1)
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"tokens_per_s": token.shape[0] / median, "median_step_s": median, "decode_steps": steps}


def cache_stats(cache: Any) -> dict[str, Any]:
    """Compressed and exact token counts, mean key and value ranks over the layers that compressed tokens, and
    the seconds spent compressing, of a `ChunkedSVDCache`; ``{}`` for a cache without ``memory_stats``."""
    stats = getattr(cache, "memory_stats", None)
    if not callable(stats):
        return {}
    s = stats()
    layers = [layer for layer in s.per_layer if layer.compressed_tokens]
    mean = (
        (lambda name: sum(getattr(x, name) for x in layers) / len(layers)) if layers else (lambda name: 0.0)
    )
    return {
        "compressed_tokens": s.compressed_tokens,
        "exact_tokens": s.exact_tokens,
        "mean_key_rank": mean("mean_key_rank"),
        "mean_value_rank": mean("mean_value_rank"),
        "compression_seconds": float(getattr(cache, "compression_seconds", 0.0)),
    }
