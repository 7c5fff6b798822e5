"""Perplexity protocols with the compressed cache in the path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from chunked_decomp.evaluation.methods import FullCache, KVMethod, chunked_method, method_from_spec
from chunked_decomp.evaluation.peers import KVPRESS_PRESSES, kvpress_available
from chunked_decomp.evaluation.perplexity import (
    compare_methods,
    continuation_perplexity,
    recall_layout,
    recall_perplexity,
    streaming_perplexity,
)
from tests.helpers.models import make_tiny_model

VOCAB = 128


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))


def _plain_perplexity(model, sequence: torch.Tensor, first_scored: int) -> float:
    """Perplexity of ``sequence[first_scored:]`` from one uncompressed full-sequence forward."""
    with torch.no_grad():
        logits = model(input_ids=sequence.unsqueeze(0)).logits[0].float()
    return math.exp(F.cross_entropy(logits[first_scored - 1 : -1], sequence[first_scored:]).item())


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_continuation_full_cache_equals_plain_forward(tiny_model_factory, ids, name):
    model = tiny_model_factory(name)
    result = continuation_perplexity(model, FullCache(), ids, context_len=300, continuation_len=120, start=40)
    expected = _plain_perplexity(model, ids[40:460], first_scored=300)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.n_tokens == 120
    assert result.nll == pytest.approx(math.log(result.perplexity))
    assert result.ratio == 1.0


def test_streaming_full_cache_equals_plain_forward(model, ids):
    result = streaming_perplexity(model, FullCache(), ids, block_size=50, max_tokens=333, start=7)
    expected = _plain_perplexity(model, ids[7:340], first_scored=1)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.n_tokens == 332


def test_recall_layout():
    ids = torch.arange(6000)  # token id = position, so the layout is readable
    context, continuation = recall_layout(ids, passage_len=100, filler_len=60, repeat_len=30, start=10)
    torch.testing.assert_close(context[:100], torch.arange(10, 110))  # the passage
    torch.testing.assert_close(context[100:], torch.arange(4206, 4266))  # other text, 4096 tokens further on
    torch.testing.assert_close(continuation, torch.arange(10, 40))  # the start of the passage, repeated
    context, _ = recall_layout(ids, 100, 60, 30, start=10, filler_start=500)
    torch.testing.assert_close(context[100:], torch.arange(500, 560))


def test_recall_layout_validates(ids):
    with pytest.raises(ValueError, match="repeat_len"):
        recall_layout(ids, passage_len=10, filler_len=10, repeat_len=20, filler_start=100)
    with pytest.raises(ValueError, match="overlaps"):
        recall_layout(ids, passage_len=100, filler_len=10, repeat_len=20, start=0, filler_start=50)
    with pytest.raises(ValueError, match="filler"):
        recall_layout(
            ids, passage_len=100, filler_len=10, repeat_len=20, start=0
        )  # default start past the end


def test_recall_full_cache_equals_plain_forward(model, ids):
    result = recall_perplexity(
        model, FullCache(), ids, passage_len=100, filler_len=60, repeat_len=30, start=10, filler_start=500
    )
    sequence = torch.cat([ids[10:110], ids[500:560], ids[10:40]])
    assert result.perplexity == pytest.approx(_plain_perplexity(model, sequence, first_scored=160), rel=1e-4)
    assert result.n_tokens == 30


def test_window_past_the_end_is_an_error(model, ids):
    with pytest.raises(ValueError, match="continuation"):
        continuation_perplexity(model, FullCache(), ids, context_len=100, continuation_len=100, start=2850)


def test_compare_methods_reports_increase(model, ids):
    methods = [FullCache(), method_from_spec("quanto2")]
    results = compare_methods(model, methods, ids, context_len=256, continuation_len=64, start=0)
    assert [r.method for r in results] == ["full", "quanto2"]
    assert results[0].increase_pct == 0.0
    assert results[1].increase_pct == pytest.approx(100 * (results[1].perplexity / results[0].perplexity - 1))
    # without a FullCache in the list, a baseline is run
    alone = compare_methods(model, methods[1:], ids, context_len=256, continuation_len=64, start=0)
    assert alone[0].increase_pct == pytest.approx(results[1].increase_pct)


def _contract_specs() -> list[str]:
    specs = ["full", "quanto4", "quanto2", "chunked:balanced@0.5", "chunked:balanced@0.25", "chunked@0.125"]
    if kvpress_available():
        specs += [f"kvpress:{name}@0.25" for name in KVPRESS_PRESSES]
    return specs


@pytest.mark.parametrize("spec", _contract_specs())
def test_every_method_through_the_protocols(model, ids, spec):
    """One matrix: every method runs continuation, recall and (where supported) streaming, stores no more than
    its budget, and its first scored token uses the exact prefill logits."""
    method: KVMethod = method_from_spec(spec)
    budget = (
        float(spec.split("@")[1])
        if "@" in spec
        else {"full": 1.0, "quanto4": 0.3125, "quanto2": 0.1875}[spec]
    )
    result = continuation_perplexity(model, method, ids, context_len=512, continuation_len=64, start=0)
    assert math.isfinite(result.perplexity) and result.perplexity > 1
    assert 0 < result.ratio <= budget * 1.001
    recall = recall_perplexity(
        model, method, ids, passage_len=256, filler_len=128, repeat_len=64, start=0, filler_start=1000
    )
    assert math.isfinite(recall.perplexity) and recall.n_tokens == 64
    if method.supports_streaming:
        streamed = streaming_perplexity(model, method, ids, block_size=64, max_tokens=320)
        assert math.isfinite(streamed.perplexity)
    else:
        with pytest.raises(NotImplementedError):
            streaming_perplexity(model, method, ids, block_size=64, max_tokens=320)
    # the first continuation token is scored with the prefill's logits, computed before any compression
    one = continuation_perplexity(model, method, ids, context_len=128, continuation_len=1, start=0)
    full = continuation_perplexity(model, FullCache(), ids, context_len=128, continuation_len=1, start=0)
    assert one.perplexity == pytest.approx(full.perplexity, rel=1e-5)


def test_chunked_streaming_compresses_as_it_goes(model, ids):
    method = chunked_method(None, 0.25, use_quantization=False, factor_dtype="float16")
    n = 1024
    result = streaming_perplexity(model, method, ids, block_size=128, max_tokens=n)
    config = method.config
    # what may stay exact: the sinks, the residual window and a chunk not yet full, in float32 (2x 16 bits)
    exact = config.num_sink_tokens + config.residual_length + config.chunk_size - 1
    assert result.ratio <= 0.25 * 1.001 + 2 * exact / n
    assert result.ratio < 1.0
    full = streaming_perplexity(model, FullCache(), ids, block_size=128, max_tokens=n)
    assert result.perplexity != full.perplexity  # the past really was compressed


@pytest.mark.slow
def test_real_model_baselines():
    """The anchors on SmolLM2-135M, float32: continuation ≈ 15.76, recall ≈ 1.17."""
    from chunked_decomp.evaluation.data import load_texts, load_token_ids
    from chunked_decomp.hf.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    token_ids = load_token_ids(tokenizer, load_texts("wikipedia"))
    continuation = continuation_perplexity(model, FullCache(), token_ids)
    assert continuation.perplexity == pytest.approx(15.76, rel=0.05)
    recall = recall_perplexity(model, FullCache(), token_ids)
    assert recall.perplexity < 1.5


@pytest.mark.parametrize("preset", ["long_context", "fast"])
@pytest.mark.parametrize("context_len", [1024, 2048])
def test_long_context_presets_meet_their_budget_from_1k_tokens(model, ids, context_len, preset):
    """`long_context` and `fast` keep 32 sink tokens exact and pay for them from the budget: from 1k context tokens
    on, the stored bytes meet 0.25 (a 512-token context holds the sinks at twice the share and overruns it, as the
    preset file says)."""
    result = continuation_perplexity(
        model, method_from_spec(f"chunked:{preset}@0.25"), ids, context_len, continuation_len=64, start=0
    )
    assert 0.24 < result.ratio <= 0.25 * 1.001
