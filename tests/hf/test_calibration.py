"""Head weights measured within compress_model for a model no shipped file covers."""

from __future__ import annotations

import logging

import pytest
import torch

from chunked_decomp import ChunkedDecomp
from chunked_decomp.config import head_weights as hw
from chunked_decomp.hf import calibration
from chunked_decomp.hf.cache import ChunkedSVDCache
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import make_bpe_tokenizer, make_tiny_model, random_ids

AUTO = dict(
    compression_ratio=0.125, chunk_size=32, residual_length=8, rank_allocation="pooled", head_weights="auto"
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer("\n\n".join(calibration.pydoc_topics()[:40]))


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch) -> None:
    monkeypatch.setattr(hw, "_warned", set())


def compressed_ranks(model, config) -> list:
    cache = ChunkedSVDCache.from_model(model, config)
    with torch.no_grad():
        model(input_ids=random_ids(160, seed=3), use_cache=True, **{cache_kwarg_name(model): cache})
    cache.compress_all()
    return [[c.keys.ranks + c.values.ranks for c in layer.chunks] for layer in cache.layers]


def test_compress_model_measures_the_weights_its_caches_use(tokenizer) -> None:
    model = make_tiny_model("llama")
    cd = ChunkedDecomp(**AUTO)
    cd.compress_model(model, tokenizer)
    kept = calibration.calibrated_weights(model)
    # The weights are head_sensitivity on the calibration window of the pydoc text, nothing else.
    start, context, continuation = calibration.calibration_window(model)
    ids = torch.tensor(
        tokenizer("\n\n".join(calibration.pydoc_topics()), add_special_tokens=False)["input_ids"]
    )
    start = min(start, ids.numel() - context - continuation)
    expected = calibration.head_sensitivity(
        model, ids, starts=(start,), context_len=context, continuation_len=continuation, power=0.5
    )
    assert kept == expected
    assert len({w for pair in kept for kind in pair for w in kind}) > 1  # the heads do differ
    with torch.no_grad():
        model(input_ids=random_ids(80), use_cache=True)
    assert cd.last_cache.compression_config.head_weights == kept
    assert cd.config.head_weights == "auto"
    weighted = ChunkedDecomp(**{**AUTO, "head_weights": kept}).config
    uniform = ChunkedDecomp(**{**AUTO, "head_weights": None}).config
    assert compressed_ranks(model, cd.config) == compressed_ranks(model, weighted)
    assert compressed_ranks(model, cd.config) != compressed_ranks(model, uniform)


def test_a_second_wiring_measures_nothing(tokenizer, monkeypatch) -> None:
    model = make_tiny_model("llama")
    calls = []
    real = calibration.head_sensitivity
    monkeypatch.setattr(calibration, "head_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    cd = ChunkedDecomp(**AUTO)
    cd.compress_model(model, tokenizer)
    cd.restore(model)
    ChunkedDecomp(**AUTO).compress_model(model, tokenizer)
    assert len(calls) == 1
    other = make_tiny_model("llama")
    assert calibration.calibrated_weights(other) is None  # kept per model object, not per architecture


def test_restore_leaves_no_trace_on_the_model(tokenizer) -> None:
    model = make_tiny_model("llama")
    before = dict(model.__dict__)
    cd = ChunkedDecomp(**AUTO)
    cd.restore(cd.compress_model(model, tokenizer))
    assert model.__dict__.keys() == before.keys()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "options",
    [
        dict(head_weights=None),
        dict(adaptive_rank=False, rank_allocation="per_layer"),
        dict(head_mode="joined"),
    ],
    ids=str,
)
def test_no_measurement_where_no_weights_are_used(tokenizer, options, monkeypatch) -> None:
    monkeypatch.setattr(calibration, "calibrate_model", lambda *a, **k: pytest.fail("calibrated"))
    model = make_tiny_model("llama")
    assert ChunkedDecomp(**{**AUTO, **options}).calibrate_heads(model, tokenizer) is False


def test_without_a_tokenizer_the_heads_are_uniform_with_a_warning(caplog) -> None:
    model = make_tiny_model("llama")
    cd = ChunkedDecomp(**AUTO)
    with caplog.at_level(logging.WARNING, logger="chunked_decomp"):
        cd.compress_model(model)
        with torch.no_grad():
            model(input_ids=random_ids(80), use_cache=True)
    assert cd.last_cache.compression_config.head_weights is None
    assert any("compress_model(model, tokenizer)" in r.getMessage() for r in caplog.records)


def test_the_window_fits_a_short_context() -> None:
    model = make_tiny_model("llama")
    model.config.max_position_embeddings = 300
    start, context, continuation = calibration.calibration_window(model)
    assert context + continuation <= 300 and context > continuation > 0
    model.config.max_position_embeddings = 4096
    assert calibration.calibration_window(model) == (1000, 1024, 512)


def test_a_model_loaded_from_a_folder_finds_its_own_tokenizer(tokenizer, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    make_tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    cd = ChunkedDecomp(**AUTO)
    cd.compress_model(model)  # no tokenizer given: the one saved beside the model is used
    kept = calibration.calibrated_weights(model)
    assert kept is not None
    twin = AutoModelForCausalLM.from_pretrained(tmp_path)  # same weights, measured with the tokenizer given
    assert kept == calibration.calibrate_model(twin, tokenizer)
