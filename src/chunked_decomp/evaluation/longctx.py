"""Long-context evaluation: the RULER-style tasks of :mod:`chunked_decomp.evaluation.ruler` through any
:class:`~chunked_decomp.evaluation.methods.KVMethod`, with the bytes each method holds at that length.

A sample's context (the instruction and the haystack) is prefilled through each method (one shared forward where
the methods' prefill is exact); its question and answer prefix then run on top of the compressed cache, and the
answer is decoded greedily (:func:`~chunked_decomp.evaluation.passkey.continue_greedy`). This is kvpress's
protocol (its pipeline compresses the context and not the question, as its RULER leaderboard is measured): an
eviction press that also scored the question's own tokens would drop parts of the question. ChunkedDecomp runs
as ``generate()`` leaves its cache: nothing is compressed beyond what the cache does by itself, so the exact
window, the sinks and the partial chunk are held and counted. Decoding stops at the model's end-of-sequence token, at the task's token budget, or once
every expected answer is in the output (RULER's score cannot change after that).

:func:`summarize` gives one row per (task, context length, method), the uncompressed score beside each: a task
the uncompressed model scores below :data:`SOLVED` on says nothing about compression and is flagged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from chunked_decomp.evaluation.methods import (
    ChunkedDecompMethod,
    KVMethod,
    PrefilledContext,
    forward_with_cache,
)
from chunked_decomp.evaluation.passkey import Tokenizer, continue_greedy
from chunked_decomp.evaluation.ruler import TaskSample, string_match_all
from chunked_decomp.evaluation.shared_prefill import prefill_together

__all__ = ["SOLVED", "as_deployed", "eos_token_ids", "run_sample", "summarize"]

#: The uncompressed score from which a task tells something about compression (the issue's and RULER's 0.5).
SOLVED = 0.5


def as_deployed(method: KVMethod) -> KVMethod:
    """``method`` as ``generate()`` runs it: ChunkedDecomp without ``compress_all`` (other methods unchanged)."""
    if isinstance(method, ChunkedDecompMethod):
        return ChunkedDecompMethod(method.config, name=method.name, compress_all=False)
    return method


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """The token ids that end a generation: the generation config's and the tokenizer's end-of-sequence ids."""
    ids: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.no_grad()
def run_sample(
    model: torch.nn.Module, tokenizer: Tokenizer, methods: Sequence[KVMethod], sample: TaskSample
) -> list[dict[str, Any]]:
    """Score ``sample`` with each of ``methods``' caches: one record per method with the greedy output, its RULER
    score and the bytes held for the prompt (``ratio``: stored bytes ÷ the prompt in an uncompressed 16-bit
    cache), measured once the question is in the cache.

    The context is prefilled through the method (the methods whose prefill is exact share one forward,
    :func:`~chunked_decomp.evaluation.shared_prefill.prefill_together`); the question then runs on top of the
    cache, as kvpress's pipeline does. ``prefill_seconds`` is the context's forward, ``seconds`` adds the
    method's question and answer."""
    stop_ids = eos_token_ids(model, tokenizer)

    def done(tokens: list[int]) -> bool:
        if tokens and tokens[-1] in stop_ids:
            return True
        return string_match_all(tokenizer.decode(tokens, skip_special_tokens=True), sample.answers) == 1.0

    device = next(model.parameters()).device
    ids = torch.tensor(sample.input_ids, dtype=torch.long, device=device).unsqueeze(0)
    split, n_tokens = sample.question_start, ids.shape[1]
    started = time.perf_counter()
    contexts = prefill_together(model, methods, ids[:, :split])
    prefill_seconds = time.perf_counter() - started
    records = []
    for method, context in zip(methods, contexts):
        started = time.perf_counter()
        logits = forward_with_cache(model, context.cache, ids[:, split:], split, logits_to_keep=1)
        storage = method.storage(model, context.cache, n_tokens)
        prompt = PrefilledContext(context.cache, logits[:, -1], n_tokens, storage)
        del context
        generated = continue_greedy(model, prompt, sample.max_new_tokens, stop=done)
        decode_seconds = time.perf_counter() - started
        del prompt  # free this cache before the next method decodes
        output = tokenizer.decode(generated, skip_special_tokens=True)
        records.append(
            {
                "task": sample.task,
                "context_length": sample.context_length,
                "index": sample.index,
                "method": method.name,
                "score": string_match_all(output, sample.answers),
                "output": output,
                "answers": list(sample.answers),
                "prompt_tokens": len(sample.input_ids),
                "new_tokens": len(generated),
                "stored_bytes": storage.stored_bytes,
                "reference_bytes": storage.reference_bytes,
                "ratio": storage.ratio,
                "cache_bytes": storage.cache_bytes,
                "prefill_seconds": prefill_seconds,
                "seconds": prefill_seconds + decode_seconds,
            }
        )
    return records


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def summarize(records: Sequence[dict[str, Any]], reference: str = "full") -> list[dict[str, Any]]:
    """One row per (task, context length, method) in first-seen order: mean score, samples, mean bytes held and
    ρ, the ``reference`` method's score on the same samples, the difference, and whether the reference solves
    the task (score >= :data:`SOLVED`)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["context_length"], r["method"]), []).append(r)
    rows = []
    for (task, length, method), rs in groups.items():
        indices = {r["index"] for r in rs}
        base = [
            r for r in groups.get((task, length, reference), []) if r["index"] in indices
        ]  # the same samples
        base_score = _mean(r["score"] for r in base)
        score = _mean(r["score"] for r in rs)
        rows.append(
            {
                "task": task,
                "context_length": length,
                "method": method,
                "score": score,
                "num_samples": len(rs),
                "reference_score": base_score,
                "score_delta": score - base_score,
                "solved_by_reference": bool(base_score >= SOLVED),
                "ratio": _mean(r["ratio"] for r in rs),
                "stored_bytes": _mean(r["stored_bytes"] for r in rs),
                "prompt_tokens": _mean(r["prompt_tokens"] for r in rs),
                "seconds": _mean(r["seconds"] for r in rs),
            }
        )
    return rows
