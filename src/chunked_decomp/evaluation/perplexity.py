"""Perplexity protocols with the compressed cache in the path.

Three protocols, each run the same way for every :class:`~chunked_decomp.evaluation.methods.KVMethod`:

* :func:`continuation_perplexity` — "context + continuation": the context is prefilled and compressed by the
  method, then the next tokens are scored teacher-forced in one forward that attends to the compressed context
  and exactly to themselves. The first scored token is predicted by the prefill's last logits. The scoring on
  top of a prefilled cache is :func:`continuation_logits`, which every caller of the protocol goes through
  (:func:`continuation_nll` for per-token losses, used by the `PerformanceEvaluator` and the benchmarks).
* :func:`streaming_perplexity` — the whole text goes through one cache in blocks, each block attending to the
  (compressed) past, as in decoding.
* :func:`recall_perplexity` — "recall": context = a passage + other text; the continuation repeats the start of
  the passage. Local-context perplexity hides what eviction loses; copying a passage from far back shows it.

:func:`compare_methods` runs a list of methods through one protocol and adds the increase over the uncompressed
baseline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from chunked_decomp.evaluation.methods import FullCache, KVMethod, StorageStats, forward_with_cache


@dataclass
class PerplexityResult:
    """Outcome of one protocol run for one method.

    perplexity: ``exp(nll)``; nll: mean negative log-likelihood (nats per token) over ``n_tokens`` scored tokens.
    stored_bytes / reference_bytes / ratio: the context as stored by the method vs an uncompressed 16-bit cache
    (ρ); ratio_cache_dtype: bytes really held vs an uncompressed cache in the model's dtype.
    increase_pct: perplexity increase over the baseline in percent (filled by :func:`compare_methods`).
    """

    method: str
    protocol: str
    perplexity: float
    nll: float
    n_tokens: int
    stored_bytes: int
    reference_bytes: int
    ratio: float
    ratio_cache_dtype: float
    seconds: float
    increase_pct: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_1d(token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


def _window(ids: torch.Tensor, start: int, length: int, what: str) -> torch.Tensor:
    if start < 0 or length < 0:
        raise ValueError(f"{what}: start and length must be >= 0, got start={start}, length={length}")
    if start + length > ids.numel():
        raise ValueError(
            f"{what}: needs tokens [{start}, {start + length}), the text has {ids.numel()} tokens"
        )
    return ids[start : start + length]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _result(
    method: KVMethod,
    protocol: str,
    nll_sum: float,
    n_tokens: int,
    storage: StorageStats,
    seconds: float,
    **extra: Any,
) -> PerplexityResult:
    nll = nll_sum / n_tokens
    return PerplexityResult(
        method=method.name,
        protocol=protocol,
        perplexity=math.exp(nll),
        nll=nll,
        n_tokens=n_tokens,
        stored_bytes=storage.stored_bytes,
        reference_bytes=storage.reference_bytes,
        ratio=storage.ratio,
        ratio_cache_dtype=storage.ratio_cache_dtype,
        seconds=seconds,
        extra=dict(extra),
    )


@torch.no_grad()
def continuation_logits(
    model: torch.nn.Module, cache: Any, last_logits: torch.Tensor, continuation: torch.Tensor, start: int
) -> torch.Tensor:
    """Logits ``(batch, n, vocab)`` predicting each token of ``continuation`` ``(batch, n)``, n ≥ 1, on top of
    ``cache`` holding ``start`` context tokens: the first from ``last_logits`` ``(batch, vocab)`` (the prefill's
    last position), the others from one teacher-forced forward of ``continuation[:, :-1]`` at positions
    ``start ..``, attending to the cache and exactly to themselves. The cache grows by n − 1 tokens."""
    target = continuation.to(_device(model))
    logits = last_logits.unsqueeze(1)  # (batch, 1, vocab)
    if target.shape[1] > 1:
        rest = forward_with_cache(model, cache, target[:, :-1], start)
        logits = torch.cat([logits, rest], dim=1)
    return logits


@torch.no_grad()
def continuation_nll(
    model: torch.nn.Module, cache: Any, last_logits: torch.Tensor, continuation: torch.Tensor, start: int
) -> torch.Tensor:
    """Per-token negative log-likelihood ``(batch, n)`` float32 (nats) of ``continuation`` ``(batch, n)``,
    scored by :func:`continuation_logits` on top of ``cache`` holding ``start`` context tokens."""
    logits = continuation_logits(model, cache, last_logits, continuation, start)
    target = continuation.to(_device(model))
    return F.cross_entropy(logits.transpose(1, 2).float(), target, reduction="none")


@torch.no_grad()
def score_after_context(
    model: torch.nn.Module,
    method: KVMethod,
    context: torch.Tensor,
    continuation: torch.Tensor,
) -> tuple[float, StorageStats]:
    """Sum of the continuation's negative log-likelihood (nats) after ``method`` prefilled ``context``.

    context: ``(context_len,)`` token ids; continuation: ``(n,)`` token ids, n ≥ 1. The first continuation token
    is scored with the prefill's last logits; the others in one teacher-forced forward at positions
    ``context_len ..``, attending to the method's cache of the context and exactly to themselves.
    """
    device = _device(model)
    prefilled = method.prefill(model, context.to(device).unsqueeze(0))
    logits = continuation_logits(
        model, prefilled.cache, prefilled.last_logits, continuation.unsqueeze(0), prefilled.context_length
    )[0]  # (n, vocab)
    # Summed over (token, vocab) rows in one call: the numbers this protocol has always reported (a sum of
    # per-token losses differs in the last bits).
    nll_sum = F.cross_entropy(logits.float(), continuation.to(device), reduction="sum").item()
    return nll_sum, prefilled.storage


def continuation_perplexity(
    model: torch.nn.Module,
    method: KVMethod,
    token_ids: torch.Tensor | Sequence[int],
    context_len: int = 1024,
    continuation_len: int = 512,
    start: int = 5000,
) -> PerplexityResult:
    """Protocol "context + continuation".

    token_ids: the text as a 1-D sequence of token ids. Context = ``token_ids[start : start + context_len]``,
    prefilled and compressed by ``method``; the next ``continuation_len`` tokens are scored teacher-forced,
    attending to the compressed context and exactly to themselves.
    """
    ids = _as_1d(token_ids)
    context = _window(ids, start, context_len, "context")
    continuation = _window(ids, start + context_len, continuation_len, "continuation")
    t0 = time.perf_counter()
    nll_sum, storage = score_after_context(model, method, context, continuation)
    return _result(
        method,
        "continuation",
        nll_sum,
        continuation_len,
        storage,
        time.perf_counter() - t0,
        context_len=context_len,
        start=start,
    )


def recall_layout(
    token_ids: torch.Tensor | Sequence[int],
    passage_len: int = 512,
    filler_len: int = 512,
    repeat_len: int = 256,
    start: int = 5000,
    filler_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token layout of the recall protocol: ``(context, continuation)``.

    context = passage ``token_ids[start : start + passage_len]`` followed by ``filler_len`` tokens of other text
    from ``filler_start`` (default: ``passage_len + 4096`` tokens after the passage, so that the filler is not
    the passage's own continuation); continuation = the first ``repeat_len`` tokens of the passage.
    """
    ids = _as_1d(token_ids)
    if repeat_len > passage_len:
        raise ValueError(f"repeat_len ({repeat_len}) must not exceed passage_len ({passage_len})")
    if filler_start is None:
        filler_start = start + passage_len + 4096
    passage = _window(ids, start, passage_len, "passage")
    filler = _window(ids, filler_start, filler_len, "filler")
    if filler_start < start + passage_len and filler_start + filler_len > start:
        raise ValueError("the filler overlaps the passage")
    return torch.cat([passage, filler]), passage[:repeat_len].clone()


def recall_perplexity(
    model: torch.nn.Module,
    method: KVMethod,
    token_ids: torch.Tensor | Sequence[int],
    passage_len: int = 512,
    filler_len: int = 512,
    repeat_len: int = 256,
    start: int = 5000,
    filler_start: int | None = None,
) -> PerplexityResult:
    """Protocol "recall": perplexity of repeating the first ``repeat_len`` tokens of a passage that lies
    ``filler_len`` tokens back in the (compressed) context. See :func:`recall_layout` for the layout.

    An uncompressed model copies almost perfectly (perplexity near 1), so the increase measures what the
    compression lost of the distant passage.
    """
    context, continuation = recall_layout(token_ids, passage_len, filler_len, repeat_len, start, filler_start)
    t0 = time.perf_counter()
    nll_sum, storage = score_after_context(model, method, context, continuation)
    return _result(
        method,
        "recall",
        nll_sum,
        repeat_len,
        storage,
        time.perf_counter() - t0,
        passage_len=passage_len,
        filler_len=filler_len,
        start=start,
    )


@torch.no_grad()
def streaming_perplexity(
    model: torch.nn.Module,
    method: KVMethod,
    token_ids: torch.Tensor | Sequence[int],
    block_size: int = 128,
    max_tokens: int | None = 2048,
    start: int = 0,
) -> PerplexityResult:
    """Protocol "streaming": ``token_ids[start : start + max_tokens]`` fed through one cache of ``method`` in
    blocks of ``block_size`` tokens at their true positions; every token but the first is scored, each block
    attending to the method's cache of everything before it (compressed as the method does while decoding;
    :meth:`~chunked_decomp.evaluation.methods.KVMethod.after_block` runs after each block).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not method.supports_streaming:
        raise NotImplementedError(f"{method.name} does not support streaming through one cache")
    ids = _as_1d(token_ids)[start:]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("streaming_perplexity needs at least 2 tokens")
    ids = ids.to(_device(model))
    t0 = time.perf_counter()
    cache = method.new_cache(model)
    nll_sum = 0.0
    previous_logits = None  # (vocab,): prediction for the first token of the next block
    for offset in range(0, ids.numel(), block_size):
        block = ids[offset : offset + block_size]
        logits = forward_with_cache(model, cache, block.unsqueeze(0), offset)[0]
        if previous_logits is not None:
            logits_for_block = torch.cat([previous_logits.unsqueeze(0), logits[:-1]])
            nll_sum += F.cross_entropy(logits_for_block, block, reduction="sum").item()
        else:
            nll_sum += F.cross_entropy(logits[:-1], block[1:], reduction="sum").item()
        previous_logits = logits[-1]
        method.after_block(cache)
    n_scored = ids.numel() - 1
    storage = method.storage(model, cache, ids.numel())
    return _result(
        method,
        "streaming",
        nll_sum,
        n_scored,
        storage,
        time.perf_counter() - t0,
        block_size=block_size,
        start=start,
    )


PROTOCOLS: dict[str, Callable[..., PerplexityResult]] = {
    "continuation": continuation_perplexity,
    "streaming": streaming_perplexity,
    "recall": recall_perplexity,
}


def add_increase(results: list[PerplexityResult], baseline: PerplexityResult) -> list[PerplexityResult]:
    """Fill ``increase_pct`` (perplexity increase over ``baseline``, percent) in place; returns ``results``."""
    for result in results:
        result.increase_pct = 100.0 * (result.perplexity / baseline.perplexity - 1.0)
    return results


def compare_methods(
    model: torch.nn.Module,
    methods: Sequence[KVMethod],
    token_ids: torch.Tensor | Sequence[int],
    protocol: str = "continuation",
    baseline: KVMethod | None = None,
    **protocol_kwargs: Any,
) -> list[PerplexityResult]:
    """Run ``methods`` through one protocol (``"continuation"``, ``"streaming"`` or ``"recall"``) and report
    each one's perplexity increase over the uncompressed baseline (the first :class:`FullCache` in
    ``methods``, else ``baseline``, else a new :class:`FullCache` run first).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    run = PROTOCOLS[protocol]
    results = [run(model, method, token_ids, **protocol_kwargs) for method in methods]
    base = next((r for r, m in zip(results, methods, strict=True) if isinstance(m, FullCache)), None)
    if base is None:
        base = run(model, baseline or FullCache(), token_ids, **protocol_kwargs)
    return add_increase(results, base)
