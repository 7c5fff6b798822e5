"""PerformanceEvaluator: values measured through the compressed cache, and text-similarity metrics."""

from __future__ import annotations

import math

import pytest
import torch

from chunked_decomp import ChunkedDecomp, CompressionConfig
from chunked_decomp.evaluation.methods import ChunkedDecompMethod, FullCache
from chunked_decomp.evaluation.perplexity import continuation_perplexity
from chunked_decomp.evaluation.quality import PerformanceEvaluator
from chunked_decomp.evaluation.text_metrics import token_agreement
from chunked_decomp.evaluation.wired import wired_decomp
from tests.helpers.models import make_tiny_model, random_ids

HEAD_DIM = 16
CTX, CONT = 96, 24
# 2 layers x 2 KV heads x 16 dims x (keys + values) x 2 bytes
BYTES_PER_TOKEN_16BIT = 2 * 2 * HEAD_DIM * 2 * 2


def exact_config(**kw) -> CompressionConfig:
    """Full rank, unquantised float32 factors: the compressed cache reproduces the exact one."""
    return CompressionConfig(
        compression_ratio=1.0,
        target_rank=HEAD_DIM,
        use_quantization=False,
        factor_dtype="float32",
        chunk_size=16,
        residual_length=16,
        **kw,
    )


def lossy_config() -> CompressionConfig:
    return CompressionConfig(
        compression_ratio=0.125, reference_dtype="float16", chunk_size=16, residual_length=16
    )


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return random_ids(600, seed=3)[0]


@pytest.fixture()
def evaluator() -> PerformanceEvaluator:
    return PerformanceEvaluator(context_length=CTX, continuation_length=CONT, decode_tokens=2, num_windows=2)


def test_exact_compression_changes_nothing(evaluator, ids):
    model = ChunkedDecomp(config=exact_config()).compress_model(make_tiny_model("llama"))
    result = evaluator.evaluate_compression(make_tiny_model("llama"), model, ids)
    assert result["compressed_tokens"] == CTX - 4  # every context token but the 4 sinks was factored
    assert abs(result["perplexity_increase"]) < 1e-3
    assert result["perplexity_compressed"] == pytest.approx(result["perplexity_original"], rel=1e-5)
    # float32 full-rank factors cost more than a 16-bit cache: the ratio says so rather than hiding it
    assert result["compression_ratio"] > 1.0
    assert result["memory_reduction"] == pytest.approx(100 * (1 - result["compression_ratio"]))


def test_values_match_the_evaluation_protocol(evaluator, ids):
    """The same windows through the evaluation harness's methods give the same perplexities and bytes."""
    model = make_tiny_model("llama")
    decomp = ChunkedDecomp(config=lossy_config())
    decomp.compress_model(model)
    result = evaluator.evaluate_compression(model, model, ids)

    plain = make_tiny_model("llama")
    nll = {"full": 0.0, "chunked": 0.0}
    stored = 0
    for w in range(2):
        start = w * (CTX + CONT)
        full = continuation_perplexity(plain, FullCache(), ids, CTX, CONT, start=start)
        comp = continuation_perplexity(
            plain, ChunkedDecompMethod(lossy_config()), ids, CTX, CONT, start=start
        )
        nll["full"] += full.nll * CONT
        nll["chunked"] += comp.nll * CONT
        stored += comp.stored_bytes
    assert result["perplexity_original"] == pytest.approx(math.exp(nll["full"] / (2 * CONT)), rel=1e-5)
    assert result["perplexity_compressed"] == pytest.approx(math.exp(nll["chunked"] / (2 * CONT)), rel=1e-5)
    assert result["perplexity_compressed"] != pytest.approx(result["perplexity_original"], rel=1e-6)
    assert result["kv_bytes_compressed"] == stored
    assert result["kv_bytes_reference"] == 2 * CTX * BYTES_PER_TOKEN_16BIT
    assert result["kv_bytes_original"] == 2 * result["kv_bytes_reference"]  # float32 model
    assert result["compression_ratio"] == pytest.approx(stored / result["kv_bytes_reference"])
    assert 0.1 < result["compression_ratio"] < 0.25  # target 0.125; the exact float32 sinks cost extra here
    assert result["speed_improvement"] > 0
    assert result["scored_tokens"] == 2 * CONT


def test_same_object_is_restored_for_the_baseline_and_rewired(evaluator, ids):
    model = make_tiny_model("llama")
    decomp = ChunkedDecomp(config=lossy_config())
    decomp.compress_model(model)
    evaluator.evaluate_compression(model, model, ids)
    assert wired_decomp(model) is decomp
    decomp.restore(model)
    assert wired_decomp(model) is None and "forward" not in model.__dict__


def test_unwired_model_is_refused(evaluator, ids):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="not wired"):
        evaluator.evaluate_compression(model, model, ids)


def test_windows_from_texts_streams_and_rows():
    ev = PerformanceEvaluator(context_length=4, continuation_length=2, start=1, num_windows=2)
    stream = torch.arange(20)
    (c0, n0), (c1, n1) = ev.windows(stream)
    assert c0.tolist() == [[1, 2, 3, 4]] and n0.tolist() == [[5, 6]]
    assert c1.tolist() == [[7, 8, 9, 10]] and n1.tolist() == [[11, 12]]
    rows = ev.windows(torch.arange(14).reshape(2, 7))
    assert rows[1][0].tolist() == [[7, 8, 9, 10, 11]] and rows[1][1].tolist() == [[12, 13]]
    with pytest.raises(ValueError, match="need 13"):
        ev.windows(torch.arange(12))
    with pytest.raises(ValueError, match="tokenizer"):
        ev.windows(["some text"])


def test_token_agreement_hand_cases():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {
        "first_divergence": 4,
        "agreement": 1.0,
        "length": 4,
    }
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == {
        "first_divergence": 1,
        "agreement": 0.75,
        "length": 4,
    }
    assert token_agreement([1, 2], [1, 2, 3, 4]) == {"first_divergence": 2, "agreement": 0.5, "length": 4}
    assert token_agreement([], [])["agreement"] == 1.0


def test_generations_agree_exactly_without_loss():
    model = ChunkedDecomp(config=exact_config()).compress_model(make_tiny_model("llama"))
    ev = PerformanceEvaluator()
    prompts = [random_ids(64, seed=s)[0] for s in (1, 2)]
    result = ev.compare_generations(make_tiny_model("llama"), model, prompts, max_new_tokens=6, metrics=())
    assert (
        result["token_agreement"] == 1.0 and result["exact_match"] == 1.0 and result["first_divergence"] == 6
    )
    # the prompt is longer than residual + chunk, so generation really ran on compressed chunks
    assert all(row["compressed_tokens"] > 0 for row in result["per_prompt"])
    assert all(len(row["compressed_ids"]) == 6 for row in result["per_prompt"])


# ---- text metrics -------------------------------------------------------------------------------------------

REFS = [
    "The cat sat on the mat and looked out of the window at the rain.",
    "Albert Einstein developed the theory of relativity in the early twentieth century.",
]
UNRELATED = [
    "Quarterly revenue grew by four percent despite supply chain problems.",
    "Add two cups of flour and stir until the dough is smooth.",
]


@pytest.fixture(scope="module")
def quality_on_identical():
    return PerformanceEvaluator().evaluate_quality(None, REFS, REFS)


def test_identical_texts_score_perfectly(quality_on_identical):
    q = quality_on_identical
    assert q["bleu"] == pytest.approx(100.0)
    assert q["rouge_l"] == pytest.approx(1.0)
    assert q["semantic_sim"] == pytest.approx(1.0, abs=1e-4)
    assert q["bleu_per_text"] == pytest.approx([100.0, 100.0])


def test_unrelated_texts_score_low(quality_on_identical):
    q = PerformanceEvaluator().evaluate_quality(None, REFS, UNRELATED)
    assert q["bleu"] < 5
    assert q["rouge_l"] < 0.25
    assert q["semantic_sim"] < 0.3


def test_paraphrase_sits_between():
    q = PerformanceEvaluator().evaluate_quality(
        None, ["A man is eating food."], ["A man is eating a piece of bread."]
    )
    assert 0.6 < q["semantic_sim"] < 0.9  # all-MiniLM-L6-v2 gives about 0.74
    assert 0 < q["rouge_l"] < 1


def test_short_texts_are_scored_by_the_orders_they_have():
    q = PerformanceEvaluator().evaluate_quality(
        None, ["the cat", "a dog ran"], ["the cat", "a dog ran"], ["bleu"]
    )
    assert q["bleu"] == pytest.approx(100.0)  # plain 4-gram BLEU would give 0 for texts under 4 words


def test_quality_input_errors():
    ev = PerformanceEvaluator()
    with pytest.raises(ValueError, match="equal length"):
        ev.evaluate_quality(None, ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="metrics must be among"):
        ev.evaluate_quality(None, ["a"], ["a"], metrics=["meteor"])
    q = ev.evaluate_quality(None, ["a b c d"], ["a b c d"], metrics=["rouge_l"])
    assert set(q) == {"model", "n_texts", "rouge_l", "rouge_l_per_text"}
