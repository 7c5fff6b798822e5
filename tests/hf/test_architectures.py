"""The full-rank contract on every attention layout of `tests.helpers.architectures`, rebuilding and attending
over the factors: a compressed cache at full rank gives the uncompressed model's logits (prefill, single-token
steps, a multi-token block, a crop), at reduced rank it keeps every token's place; an attention argument the
factored path cannot honour is refused, never dropped; ``decode_attention="auto"`` attends over the factors on
every layout that allows it."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.backends import cpu_kernel
from chunked_decomp.hf.attention import ATTENTION_NAME, restore_attention
from chunked_decomp.hf.layer import ChunkedSVDLayer
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.architectures import ARCHITECTURES
from tests.helpers.logits import assert_exact
from tests.helpers.models import random_ids

BASE = dict(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8, compression_ratio=0.25)
FULL = dict(target_rank=256, use_quantization=False, factor_dtype="float32")
STEPS = [40] + [1] * 12 + [3]  # prefill, decoding steps, a multi-token block
# Latent attention rebuilds its keys from what the cache returns: factored decoding cannot serve it, and says so.
CHANGES_KEYS_AFTER_THE_CACHE = {"deepseek_v3_value_head"}
_MODELS: dict[str, torch.nn.Module] = {}


def model_named(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = ARCHITECTURES[name]()
    return _MODELS[name]


@torch.no_grad()
def stepwise(model, cache, ids: torch.Tensor) -> torch.Tensor:
    name, out, at = cache_kwarg_name(model), [], 0
    for n in STEPS:
        out.append(model(input_ids=ids[:, at : at + n], **{name: cache}, use_cache=True).logits)
        at += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("decode", ["rebuild", "factored"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_full_rank_equals_uncompressed(arch, decode) -> None:
    model = model_named(arch)
    ids = random_ids(sum(STEPS), seed=41)
    want = stepwise(model, DynamicCache(config=model.config), ids)
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE, **FULL, decode_attention=decode))
    try:
        if decode == "factored" and arch in CHANGES_KEYS_AFTER_THE_CACHE:
            with pytest.raises(ValueError, match="decode_attention='rebuild'"):
                stepwise(model, cache, ids)
            return
        got = stepwise(model, cache, ids)
    finally:
        restore_attention(model)
    assert cache.memory_stats().compressed_tokens >= 24
    assert_exact(got, want)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_auto_attends_over_the_factors_where_the_attention_allows_it(arch) -> None:
    model = model_named(arch)
    ids = random_ids(sum(STEPS), seed=41)
    want = stepwise(model, DynamicCache(config=model.config), ids)
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE, **FULL))  # decode_attention="auto"
    factored = arch not in CHANGES_KEYS_AFTER_THE_CACHE and cpu_kernel.available()
    try:
        assert cache.compression_config.decode_attention == ("factored" if factored else "rebuild")
        assert (model.config._attn_implementation == ATTENTION_NAME) == factored
        got = stepwise(model, cache, ids)
    finally:
        restore_attention(model)
    assert_exact(got, want)


def test_auto_rebuilds_without_the_kernel(monkeypatch) -> None:
    monkeypatch.setenv(
        "CHUNKED_DECOMP_KERNELS", "0"
    )  # the PyTorch factored path is no faster than the rebuild
    model = model_named("llama_mqa")
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE))
    assert cache.compression_config.decode_attention == "rebuild"
    assert model.config._attn_implementation != ATTENTION_NAME


def test_auto_says_once_why_it_rebuilds(caplog) -> None:
    model = ARCHITECTURES["deepseek_v3_value_head"]()
    with caplog.at_level(logging.INFO, logger="chunked_decomp"):
        for _ in range(2):
            ChunkedSVDCache.from_model(model, CompressionConfig(**BASE))
    said = [r.getMessage() for r in caplog.records if "decode_attention='auto'" in r.getMessage()]
    assert len(said) == 1 and "latent attention" in said[0], said


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reduced_rank_keeps_every_token_in_place(arch) -> None:
    model = model_named(arch)
    ids = random_ids(sum(STEPS), seed=42)
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE))
    got = stepwise(model, cache, ids)
    want = stepwise(model, DynamicCache(config=model.config), ids)
    assert torch.isfinite(got).all()
    # One KV head or partial rotary on a peaked tiny model loses about half of the logits' norm at this budget; a
    # cache that lost its place would give unrelated logits (relative error above 1).
    assert 0 < float((got - want).norm() / want.norm()) < 0.75
    for layer in cache.layers:
        if isinstance(layer, ChunkedSVDLayer):
            assert layer.get_seq_length() == sum(STEPS)
            assert layer.sink_length + layer.compressed_length + layer.tail_length == sum(STEPS)
            assert layer.compressed_length > 0


def test_an_argument_the_factored_attention_cannot_honour_is_refused() -> None:
    """A model passing attention sinks (``s_aux``) or packed-sequence boundaries to the attention: the factored
    path names the argument instead of computing scores without it."""
    from chunked_decomp.backends.context import CONTEXT_ATTR
    from chunked_decomp.hf.attention import factored_attention

    model = model_named("llama_mqa")
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE, decode_attention="factored"))
    try:
        stepwise(model, cache, random_ids(sum(STEPS), seed=43))
        layer = cache.layers[0]
        keys, values = layer.factored_context().handles()
        assert getattr(keys, CONTEXT_ATTR) is not None
        query = torch.randn(1, 4, 1, 16)
        attn = model.model.layers[0].self_attn
        for name, value in (
            ("s_aux", torch.zeros(4)),
            ("cu_seq_lens_q", torch.tensor([0, 1])),
            ("sliding_window", 8),
        ):
            with pytest.raises(ValueError, match=name):
                factored_attention(attn, query, keys, values, None, **{name: value})
        out, _ = factored_attention(attn, query, keys, values, None, position_ids=None, use_cache=True)
        assert out.shape == (1, 1, 4, 16)
    finally:
        restore_attention(model)


EXPECTED_ROTARY = {
    "gemma2_softcap": "full layers",
    "gemma3_like": "full layers",
    "deepseek_v3_value_head": None,
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_rotary_embedding_is_found_per_layer_and_checked(arch, caplog) -> None:
    """Each compressed layer gets the frequencies of its layer type, checked on the model itself (keys at
    positions 7-10 are those at 0-3 rotated by 7); a rotation the library cannot follow (DeepSeek's latent keys)
    leaves the keys post-rotary, with a warning."""
    model = model_named(arch)
    with caplog.at_level("WARNING", logger="chunked_decomp"):
        cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE))
    layers = [layer for layer in cache.layers if isinstance(layer, ChunkedSVDLayer)]
    found = [layer.store.inv_freq is not None for layer in layers]
    if EXPECTED_ROTARY.get(arch, "all") is None:
        assert not any(found) and "compressed after the rotary embedding" in caplog.text
    else:
        assert all(found) and "rotary" not in caplog.text
    if arch == "gemma3_like":  # the full layers use the full layers' frequencies, not the sliding ones
        rotary = model.model.rotary_emb
        assert torch.equal(layers[0].store.inv_freq, rotary.full_attention_original_inv_freq.float())


def test_a_rotation_at_other_frequencies_is_not_taken_for_the_model_s() -> None:
    from chunked_decomp.hf.models import rotary_inv_freq, rotary_matches

    model = ARCHITECTURES["llama_mqa"]()
    inv = rotary_inv_freq(model)
    assert rotary_matches(model, 0, inv)
    assert not rotary_matches(model, 1, inv * 1.5)
