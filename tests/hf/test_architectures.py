"""The full-rank contract on every attention layout of `tests.helpers.architectures`, rebuilding and attending
over the factors: a compressed cache at full rank gives the uncompressed model's logits (prefill, single-token
steps, a multi-token block, a crop), at reduced rank it keeps every token's place; an attention argument the
factored path cannot honour is refused, never dropped."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.hf.attention import restore_attention
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
