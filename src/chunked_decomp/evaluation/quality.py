"""`PerformanceEvaluator`: what a compressed cache costs and saves, measured through the compressed cache.

Every number about the compressed model comes from a run whose attention reads the compressed chunks:

* ``evaluate_compression`` follows the "context + continuation" protocol (see
  :mod:`chunked_decomp.evaluation.perplexity`) through the *wired* model's own forward: the context is prefilled
  (the wrapper installed by :meth:`ChunkedDecomp.compress_model` hands the forward a fresh `ChunkedSVDCache`),
  every exact token but the attention sinks is compressed, and the continuation is scored teacher-forced while
  attending to the compressed context. A plain full forward over context + continuation would attend to exact
  keys and values and measure nothing. Decoding speed is timed one token per step on the same caches.
* ``compare_generations`` lets both models generate greedily (``generate`` of the wired model uses the
  compressed cache, compressing chunks as they age out of the residual window) and compares the tokens and
  texts; ``evaluate_quality`` scores texts against references with BLEU (sacrebleu), ROUGE-L (rouge-score)
  and the cosine similarity of all-MiniLM-L6-v2 sentence embeddings.

Bytes follow the project's convention: ``compression_ratio`` (ρ) is the bytes the compressed cache holds for the
context ÷ the same tokens in an uncompressed 16-bit cache, and ``memory_reduction`` is ``100 (1 − ρ)``; the
bytes against the model's own cache dtype (float32 on CPU) are reported beside them.

The pieces it is built from live apart: running a wired model (:mod:`chunked_decomp.evaluation.wired`), the
continuation's scoring (:func:`chunked_decomp.evaluation.perplexity.continuation_nll`) and the text metrics
(:mod:`chunked_decomp.evaluation.text_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from chunked_decomp.evaluation.memory import MemoryTracker, cache_nbytes
from chunked_decomp.evaluation.methods import reference_storage
from chunked_decomp.evaluation.perplexity import continuation_nll
from chunked_decomp.evaluation.text_metrics import (
    QUALITY_METRICS,
    semantic_similarity,
    text_scores,
    token_agreement,
)
from chunked_decomp.evaluation.wired import (
    cache_stats,
    decode_speed,
    prefill,
    uncompressed,
    wired_decomp,
)

# This module's interface, though all but the evaluator are defined in wired.py and text_metrics.py.
__all__ = [
    "PerformanceEvaluator",
    "decode_speed",
    "semantic_similarity",
    "token_agreement",
    "wired_decomp",
]


def compression_summary(
    base: dict[str, Any],
    comp: dict[str, Any],
    reference: int,
    windows: list,
    decode_tokens: int,
    config: dict,
) -> dict[str, Any]:
    """:meth:`PerformanceEvaluator.evaluate_compression`'s result from the two sides' measurements (``base``
    uncompressed, ``comp`` compressed) and the bytes of an uncompressed 16-bit cache of the context."""
    rho = comp["kv_bytes"] / reference
    return {
        "compression_ratio": rho,
        "perplexity_increase": 100.0 * (comp["perplexity"] / base["perplexity"] - 1.0),
        "memory_reduction": 100.0 * (1.0 - rho),
        "speed_improvement": comp["tokens_per_s"] / base["tokens_per_s"],
        "perplexity_original": base["perplexity"],
        "perplexity_compressed": comp["perplexity"],
        "kv_bytes_compressed": comp["kv_bytes"],
        "kv_bytes_reference": reference,
        "kv_bytes_original": base["kv_bytes"],
        "memory_reduction_vs_model_dtype": 100.0 * (1.0 - comp["kv_bytes"] / base["kv_bytes"]),
        "decode_tokens_per_s_original": base["tokens_per_s"],
        "decode_tokens_per_s_compressed": comp["tokens_per_s"],
        "prefill_seconds_original": base["prefill_seconds"],
        "prefill_seconds_compressed": comp["prefill_seconds"],
        "peak_memory_mb_original": base["peak_memory_mb"],
        "peak_memory_mb_compressed": comp["peak_memory_mb"],
        "compressed_tokens": comp.get("compressed_tokens", 0),
        "exact_tokens": comp.get("exact_tokens", 0),
        "mean_key_rank": comp.get("mean_key_rank", 0.0),
        "mean_value_rank": comp.get("mean_value_rank", 0.0),
        "compression_seconds": comp.get("compression_seconds", 0.0),
        "scored_tokens": comp["scored_tokens"],
        "num_windows": len(windows),
        "context_length": windows[0][0].shape[1],
        "continuation_length": windows[0][1].shape[1],
        "decode_tokens": decode_tokens,
        "config": config,
    }


class PerformanceEvaluator:
    """Compression ratio, perplexity increase, memory reduction and speed of a compressed model, and the
    fidelity of its generations.

    Args:
        tokenizer: used when ``test_data`` or prompts are strings.
        context_length: context tokens per window, prefilled and compressed.
        continuation_length: tokens scored after the context (≥ 1).
        start: where the first window starts in a token stream.
        num_windows: windows taken from a token stream (consecutive, non-overlapping).
        decode_tokens: greedy decoding steps timed for the speed comparison.
        compress_context: compress every exact context token but the sinks after the prefill (the measured
            protocol); ``False`` keeps the cache's own policy (the residual window stays exact).

    Example::

        cd = ChunkedDecomp(compression_ratio=0.25)
        model = cd.compress_model(model)
        ev = PerformanceEvaluator(tokenizer, context_length=1024, continuation_length=512, start=5000)
        ev.evaluate_compression(model, model, token_ids)   # the same object: restored for the baseline
    """

    def __init__(
        self,
        tokenizer: Any = None,
        context_length: int = 1024,
        continuation_length: int = 512,
        start: int = 0,
        num_windows: int = 1,
        decode_tokens: int = 16,
        compress_context: bool = True,
    ):
        for name, value, low in (
            ("context_length", context_length, 1),
            ("continuation_length", continuation_length, 1),
            ("start", start, 0),
            ("num_windows", num_windows, 1),
            ("decode_tokens", decode_tokens, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.continuation_length = continuation_length
        self.start = start
        self.num_windows = num_windows
        self.decode_tokens = decode_tokens
        self.compress_context = compress_context

    # ---- data ---------------------------------------------------------------------------------------------
    def windows(self, test_data: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(context (1, context_length), continuation (1, continuation_length))`` pairs from ``test_data``.

        test_data: a 1-D token stream (tensor or list of ints; windows cut from ``start``), a 2-D tensor
            ``(n, L)`` whose rows are windows (last ``continuation_length`` tokens scored), or a list of strings
            (joined with blank lines and tokenized without special tokens).
        """
        if isinstance(test_data, (list, tuple)) and test_data and all(isinstance(t, str) for t in test_data):
            if self.tokenizer is None:
                raise ValueError("test_data is text: pass a tokenizer to PerformanceEvaluator(tokenizer=...)")
            from chunked_decomp.evaluation.data import load_token_ids

            test_data = load_token_ids(self.tokenizer, list(test_data))
        ids = torch.as_tensor(test_data, dtype=torch.long)
        n_ctx, n_cont = self.context_length, self.continuation_length
        if ids.dim() == 2:
            if ids.shape[1] <= n_cont:
                raise ValueError(
                    f"test_data rows hold {ids.shape[1]} tokens; need more than continuation_length={n_cont}"
                )
            return [(row[None, :-n_cont], row[None, -n_cont:]) for row in ids]
        if ids.dim() != 1:
            raise ValueError(
                f"test_data must be a token stream, a (n, L) tensor or texts, got shape {tuple(ids.shape)}"
            )
        span = n_ctx + n_cont
        need = self.start + span * self.num_windows
        if ids.numel() < need:
            raise ValueError(
                f"test_data has {ids.numel()} tokens; {self.num_windows} window(s) of {n_ctx} context + {n_cont} "
                f"continuation tokens from start={self.start} need {need}"
            )
        out = []
        for w in range(self.num_windows):
            s = self.start + w * span
            out.append((ids[None, s : s + n_ctx], ids[None, s + n_ctx : s + span]))
        return out

    # ---- one side of the comparison -----------------------------------------------------------------------
    def _measure(self, model: torch.nn.Module, windows: list, compressed: bool) -> dict[str, Any]:
        nll_sum, n_tokens, kv_bytes, n_ctx = 0.0, 0, 0, 0
        stats: dict[str, Any] = {}
        with MemoryTracker() as tracker:
            for context, continuation in windows:
                cache, last, _ = prefill(model, context, compress=compressed and self.compress_context)
                if compressed and not hasattr(cache, "compress_all"):
                    raise RuntimeError(
                        "the compressed model's forward did not use a ChunkedSVDCache; "
                        "wire it with ChunkedDecomp.compress_model(model)"
                    )
                kv_bytes += cache_nbytes(cache)
                n_ctx += context.shape[1]
                stats = cache_stats(cache) or stats
                nll = continuation_nll(model, cache, last, continuation, context.shape[1])
                nll_sum += nll.sum().item()
                n_tokens += nll.numel()
                del cache
            context = windows[0][0]
            cache, last, prefill_s = prefill(model, context, compress=compressed and self.compress_context)
            speed = decode_speed(model, cache, last, context.shape[1], self.decode_tokens)
        nll = nll_sum / n_tokens
        return {
            "perplexity": math.exp(nll),
            "nll": nll,
            "scored_tokens": n_tokens,
            "kv_bytes": kv_bytes,
            "context_tokens": n_ctx,
            "prefill_seconds": prefill_s,
            "peak_memory_mb": tracker.get_peak_memory(),
            **speed,
            **stats,
        }

    # ---- public API ---------------------------------------------------------------------------------------
    def evaluate_compression(
        self, original_model: torch.nn.Module, compressed_model: torch.nn.Module, test_data: Any
    ) -> dict[str, Any]:
        """Compare ``compressed_model`` (wired by :meth:`ChunkedDecomp.compress_model`) with ``original_model``.

        ``original_model`` may be the very same object (it is restored for the baseline and wired again after),
        or a second copy; if it is wired itself, it runs restored too. Both see the same windows of
        ``test_data`` (see :meth:`windows`).

        Returns a dict with, first, the four headline numbers:

        * ``compression_ratio``: ρ = bytes the compressed cache holds for the context ÷ an uncompressed 16-bit
          cache of the same tokens (factors, scales and exact sinks all counted);
        * ``perplexity_increase``: percent, continuation perplexity compressed vs original;
        * ``memory_reduction``: percent, ``100 (1 − ρ)``;
        * ``speed_improvement``: ×, decode tokens/s compressed ÷ original (below 1 = slower);

        then ``perplexity_original`` / ``_compressed``, ``kv_bytes_compressed``, ``kv_bytes_reference`` (16-bit),
        ``kv_bytes_original`` (as the original model held it, in its dtype), ``memory_reduction_vs_model_dtype``,
        decode tokens/s, peak process memory of each run (MB; RSS on CPU, which also holds the weights), mean
        ranks, compressed and exact token counts and the config.
        """
        decomp = wired_decomp(compressed_model)
        if decomp is None:
            raise ValueError(
                "compressed_model is not wired to a compressed cache: pass the model returned by "
                "ChunkedDecomp.compress_model(model)"
            )
        windows = self.windows(test_data)
        with uncompressed(original_model):
            base = self._measure(original_model, windows, compressed=False)
        comp = self._measure(compressed_model, windows, compressed=True)
        reference, _ = reference_storage(compressed_model, base["context_tokens"])
        return compression_summary(
            base, comp, reference, windows, self.decode_tokens, decomp.config.to_dict()
        )

    def evaluate_quality(
        self,
        model: torch.nn.Module | None,
        reference_texts: Sequence[str],
        generated_texts: Sequence[str],
        metrics: Sequence[str] = QUALITY_METRICS,
    ) -> dict[str, Any]:
        """Corpus BLEU (sacrebleu, 0–100, with effective n-gram order), mean ROUGE-L F1 (rouge-score, 0–1) and
        mean semantic similarity (cosine of all-MiniLM-L6-v2 embeddings, −1–1) of ``generated_texts`` against
        ``reference_texts`` (:func:`~chunked_decomp.evaluation.text_metrics.text_scores`).

        model: the model that produced ``generated_texts``; only its class name is recorded (may be ``None``).
        With references = the uncompressed model's generations, these measure the compressed model's fidelity.
        Also returns ``bleu_per_text``, ``rouge_l_per_text`` and ``semantic_sim_per_text``.
        """
        refs, gens = list(reference_texts), list(generated_texts)
        scores = text_scores(refs, gens, metrics)
        return {"model": type(model).__name__ if model is not None else None, "n_texts": len(refs), **scores}

    @torch.no_grad()
    def generate_both(
        self,
        original_model: torch.nn.Module,
        compressed_model: torch.nn.Module,
        prompts: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int = 32,
        ignore_eos: bool = True,
    ) -> list[dict[str, Any]]:
        """Greedy generations of both models for each prompt (batch 1, no padding).

        The compressed model's ``generate`` runs on its compressed cache (chunks compressed as they age out of
        the residual window, so prompts longer than ``residual_length + chunk_size`` tokens exercise it).
        ``ignore_eos`` makes both generate exactly ``max_new_tokens`` tokens, so they compare position by
        position. Returns per prompt: token ids and texts of both, and the cache's compressed token count.
        """
        decomp = wired_decomp(compressed_model)
        if decomp is None:
            raise ValueError(
                "compressed_model is not wired: pass the model returned by ChunkedDecomp.compress_model"
            )
        rows = []
        for prompt in prompts:
            ids = self._prompt_ids(prompt).to(next(compressed_model.parameters()).device)
            kwargs = self._greedy_kwargs(ids, compressed_model, max_new_tokens, ignore_eos)
            with uncompressed(original_model):
                ref = original_model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
            gen = compressed_model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
            stats = cache_stats(decomp.last_cache) if decomp.last_cache is not None else {}
            row = {
                "prompt_tokens": ids.shape[1],
                "original_ids": ref,
                "compressed_ids": gen,
                "compressed_tokens": stats.get("compressed_tokens", 0),
                **token_agreement(ref, gen),
            }
            if self.tokenizer is not None:
                row["original_text"] = self.tokenizer.decode(ref, skip_special_tokens=True)
                row["compressed_text"] = self.tokenizer.decode(gen, skip_special_tokens=True)
            rows.append(row)
        return rows

    def _prompt_ids(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``(1, n)`` token ids of a prompt: text tokenized without special tokens, or ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompts are text: pass a tokenizer to PerformanceEvaluator(tokenizer=...)")
            return self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)

    def _greedy_kwargs(
        self, ids: torch.Tensor, model: torch.nn.Module, max_new_tokens: int, ignore_eos: bool
    ) -> dict[str, Any]:
        """``generate`` arguments of a greedy run (no padding: batch 1), with a pad token id generate accepts."""
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
        }
        if ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        kwargs["pad_token_id"] = pad if pad is not None else 0
        return kwargs

    def compare_generations(
        self,
        original_model: torch.nn.Module,
        compressed_model: torch.nn.Module,
        prompts: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int = 32,
        metrics: Sequence[str] = QUALITY_METRICS,
    ) -> dict[str, Any]:
        """Generate with both models (:meth:`generate_both`) and compare.

        Returns ``first_divergence`` (mean tokens generated identically before the first difference),
        ``token_agreement`` (mean fraction of equal positions), ``exact_match`` (fraction of prompts whose
        generations are identical), the text metrics of :meth:`evaluate_quality` with the original model's
        texts as references (when a tokenizer decodes them), and ``per_prompt`` rows.
        """
        rows = self.generate_both(original_model, compressed_model, prompts, max_new_tokens)
        n = len(rows)
        result: dict[str, Any] = {
            "first_divergence": sum(r["first_divergence"] for r in rows) / n,
            "token_agreement": sum(r["agreement"] for r in rows) / n,
            "exact_match": sum(r["original_ids"] == r["compressed_ids"] for r in rows) / n,
            "max_new_tokens": max_new_tokens,
            "n_prompts": n,
        }
        if self.tokenizer is not None and metrics:
            quality = self.evaluate_quality(
                compressed_model,
                [r["original_text"] for r in rows],
                [r["compressed_text"] for r in rows],
                metrics,
            )
            result.update({k: v for k, v in quality.items() if k not in ("model", "n_texts")})
        result["per_prompt"] = rows
        return result
