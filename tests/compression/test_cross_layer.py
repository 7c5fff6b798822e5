"""Compression batched across layers (``parallel_processing``): the cache lets the chunks that age out during a
forward pass wait exact until the last layer has been updated, then factors and encodes the chunks of all layers
in batched calls of at most ``_BATCH_BYTES``. The result must equal compressing layer by layer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import chunked_decomp.compression.engine as engine
from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.hf.layer import ChunkedSVDLayer
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import COMMON, DECODER, build, random_ids

BASE = dict(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8, compression_ratio=0.25)
LAYERS = 4


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return build(LlamaForCausalLM, LlamaConfig(**{**DECODER, "num_hidden_layers": LAYERS}, **COMMON))


@pytest.fixture
def calls(monkeypatch) -> list[list[int]]:
    """Records, for every call of `engine.compress`, the indices of the layers it compressed."""
    seen: list[list[int]] = []
    real = engine.compress

    def spy(requests):
        seen.append([r.store.layer_idx for r in requests])
        return real(requests)

    monkeypatch.setattr(engine, "compress", spy)
    return seen


@torch.no_grad()
def run(
    model, config: CompressionConfig, ids: torch.Tensor, prefill: int
) -> tuple[ChunkedSVDCache, torch.Tensor]:
    """Prefill, then one token at a time; the cache and all logits."""
    cache = ChunkedSVDCache.from_model(model, config)
    kw = {cache_kwarg_name(model): cache, "use_cache": True}
    logits = [model(input_ids=ids[:, :prefill], **kw).logits]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(input_ids=ids[:, t : t + 1], **kw).logits)
    return cache, torch.cat(logits, 1)


@pytest.mark.parametrize(
    "extra",
    [{}, {"dynamic_chunking": True}, {"compress_keys_pre_rope": False}, {"use_quantization": False}],
    ids=["default", "dynamic_chunking", "post_rope", "unquantised"],
)
def test_batched_across_layers_equals_layer_by_layer(model, calls, extra) -> None:
    ids = random_ids(140, seed=11)
    batched, got = run(model, CompressionConfig(**BASE, **extra), ids, prefill=100)
    batched.compress_all()
    prefill_calls = calls[0]
    calls.clear()
    alone, ref = run(model, CompressionConfig(**BASE, **extra, parallel_processing=False), ids, prefill=100)
    alone.compress_all()
    # Batched: the prefill's chunks of all four layers went through one call; one layer at a time otherwise.
    assert prefill_calls == list(range(LAYERS))
    assert all(len(c) == 1 for c in calls)
    for a, b in zip(batched.layers, alone.layers):
        assert [c.start for c in a.chunks] == [c.start for c in b.chunks]
        assert [c.keys.ranks + c.values.ranks for c in a.chunks] == [
            c.keys.ranks + c.values.ranks for c in b.chunks
        ]
        assert a.memory_stats().stored_bytes == b.memory_stats().stored_bytes
        # Batched products may round differently in the last bits, which can move a 4-bit code by one step in a
        # small component; a chunk taken from the wrong layer or offset would differ by O(1).
        for x, y in zip(a.reconstruct_compressed(), b.reconstruct_compressed()):
            assert (x - y).abs().max() <= 1e-3 * y.abs().max()
    assert (got - ref).abs().max() <= 1e-4


def test_aged_tokens_wait_exact_until_the_last_layer(model) -> None:
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE))
    k = torch.randn(1, 2, 40, 16)
    for i in range(LAYERS - 1):
        cache.update(k, k, i)
    # Layers 0-2 hold all 40 tokens exact, waiting for layer 3; nothing is compressed yet.
    assert [cache.layers[i].tail_length for i in range(LAYERS - 1)] == [40] * (LAYERS - 1)
    assert all(not layer.chunks for layer in cache.layers)
    assert cache.get_seq_length() == 40
    cache.update(k, k, LAYERS - 1)
    # 2 sinks, 3 chunks of 8 and a residual window of 14 (≥ 8, < 8 + 8) in every layer.
    for layer in cache.layers:
        assert (layer.sink_length, layer.compressed_length, layer.tail_length) == (2, 24, 14)


def test_memory_stats_and_a_new_pass_compress_what_waits(model, calls) -> None:
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**BASE))
    k = torch.randn(1, 2, 40, 16)
    cache.update(k, k, 0)
    stats = cache.memory_stats()  # reports what is held once the waiting chunks are compressed
    assert stats.per_layer[0].compressed_tokens == 24
    assert calls == [[0]]
    # A layer updated again before the last layer was reached (an interrupted pass) first compresses what waits.
    cache.update(k, k, 1)
    cache.update(k[..., :8, :], k[..., :8, :], 1)
    assert calls == [[0], [1]]
    layer = cache.layers[1]
    assert (layer.compressed_length, layer.tail_length, layer.get_seq_length()) == (24, 22, 48)


def test_batches_are_bounded_in_bytes(model, calls, monkeypatch) -> None:
    # Room for two layers' aged tokens: a 100-token prefill (88 tokens to compress per layer, 2 heads, d 16).
    per_layer = 88 * 2 * (16 + 16) * 4
    monkeypatch.setattr(engine, "BATCH_BYTES", 2 * per_layer + 100)
    ids = random_ids(100, seed=12)
    cache, _ = run(model, CompressionConfig(**BASE), ids, prefill=100)
    bounded = [layer.chunks[-1].start for layer in cache.layers]
    assert calls == [[0, 1], [2, 3]]
    monkeypatch.setattr(engine, "BATCH_BYTES", 8 << 20)
    cache, _ = run(model, CompressionConfig(**BASE), ids, prefill=100)
    assert [layer.chunks[-1].start for layer in cache.layers] == bounded


def test_compress_all_batches_the_final_chunks(model, calls) -> None:
    cache, _ = run(model, CompressionConfig(**BASE), random_ids(60, seed=13), prefill=60)
    calls.clear()
    cache.compress_all()
    assert calls == [list(range(LAYERS))]
    assert all(isinstance(layer, ChunkedSVDLayer) and layer.tail_length == 0 for layer in cache.layers)
    assert [s.compressed_tokens for s in cache.memory_stats().per_layer] == [58] * LAYERS


def test_layers_dispatched_by_accelerate_compress_as_in_one_piece(model, tmp_path) -> None:
    """`device_map` placement: accelerate's hooks move each layer's weights in and its inputs along; the cache
    layers follow their attention layers' keys. Half the layers offloaded to disk is the nearest a CPU-only
    machine comes to layers on several devices."""
    import copy

    accelerate = pytest.importorskip("accelerate")
    dispatched = copy.deepcopy(model)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    device_map |= {f"model.layers.{i}": "cpu" if i % 2 == 0 else "disk" for i in range(LAYERS)}
    accelerate.dispatch_model(dispatched, device_map=device_map, offload_dir=str(tmp_path))
    assert any(hasattr(m, "_hf_hook") for m in dispatched.modules())
    ids = random_ids(120, seed=14)
    ref_cache, ref = run(model, CompressionConfig(**BASE), ids, prefill=100)
    cache, got = run(dispatched, CompressionConfig(**BASE), ids, prefill=100)
    assert cache.memory_stats().compressed_tokens == ref_cache.memory_stats().compressed_tokens > 80
    assert cache.memory_stats().stored_bytes == ref_cache.memory_stats().stored_bytes
    assert (got - ref).abs().max() <= 1e-4
