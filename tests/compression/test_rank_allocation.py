"""Rank allocation across layers: ``rank_allocation="pooled"`` ranks the components of all chunks compressed
in one call (all layers, keys and values, every head) against their summed budget; ``head_weights`` (from
:func:`chunked_decomp.evaluation.calibration.head_sensitivity`) weight each head's energy shares."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.evaluation.calibration import head_sensitivity
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import COMMON, DECODER, build, random_ids

BASE = dict(chunk_size=32, residual_length=8, num_sink_tokens=2, quant_group_size=8, compression_ratio=0.25)
HEADS, DIM = 2, 16


def states(kind: str, tokens: int = 130, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (1, HEADS, tokens, DIM): ``"flat"`` = isotropic noise (energy spread over every
    component), ``"steep"`` = rank 2 plus 1% noise (energy in two components)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(1, HEADS, tokens, DIM, generator=g)
        if kind == "steep":
            x = torch.randn(1, HEADS, tokens, 2, generator=g) @ torch.randn(1, HEADS, 2, DIM, generator=g)
            x = x + 0.01 * torch.randn(1, HEADS, tokens, DIM, generator=g)
        out.append(x)
    return out[0], out[1]


def compressed(
    config: CompressionConfig, layer_states: list[tuple[torch.Tensor, torch.Tensor]]
) -> ChunkedSVDCache:
    """A model-free cache of ``len(layer_states)`` layers, each prefilled with its states, then compressed."""
    cache = ChunkedSVDCache(config, num_layers=len(layer_states))
    for i, (k, v) in enumerate(layer_states):
        cache.update(k, v, i)
    cache.compress_all()
    return cache


def ranks(cache: ChunkedSVDCache) -> list[list[list[int]]]:
    """Per layer, per chunk: key ranks then value ranks."""
    return [[c.keys.ranks + c.values.ranks for c in layer.chunks] for layer in cache.layers]


def stored_vs_budget(cache: ChunkedSVDCache) -> float:
    return cache.memory_stats().aged_ratio / cache.compression_config.compression_ratio


def test_identical_layers_get_the_per_layer_ranks() -> None:
    # One chunk per layer and no sinks, so every layer's budget is its chunk's allowance. Pooled over identical
    # layers, the threshold is the per-layer one; only bytes left over by all layers together may buy a
    # component more (ties go to the first layers).
    same = [states("flat", tokens=32)] * 3
    one_chunk = {**BASE, "num_sink_tokens": 0}
    per_layer = ranks(compressed(CompressionConfig(**one_chunk), same))
    pooled = ranks(compressed(CompressionConfig(**one_chunk, rank_allocation="pooled"), same))
    assert [len(r) for r in per_layer] == [1, 1, 1]
    assert len({str(r) for r in per_layer}) == 1
    extra = 0
    for layer_p, layer_l in zip(pooled, per_layer):
        for chunk_p, chunk_l in zip(layer_p, layer_l):
            diff = [a - b for a, b in zip(chunk_p, chunk_l)]
            assert all(d in (0, 1) for d in diff), (chunk_p, chunk_l)
            extra += sum(diff)
    assert extra < len(same) * len(pooled[0])


def test_a_flatter_spectrum_gets_more_rank_within_the_same_bytes() -> None:
    layers = [states("steep", seed=1), states("flat", seed=2)]
    # At 0.125 the flat layer cannot reach full rank even with both layers' bytes.
    low = {**BASE, "compression_ratio": 0.125}
    per_layer = compressed(CompressionConfig(**low), layers)
    pooled = compressed(CompressionConfig(**low, rank_allocation="pooled"), layers)
    mean = lambda c, i: sum(map(sum, ranks(c)[i])) / len(ranks(c)[i])  # noqa: E731
    assert mean(pooled, 0) < mean(per_layer, 0)
    assert mean(pooled, 1) > mean(per_layer, 1)
    # The steep layer needs two components; the flat one takes the bytes it frees.
    assert max(max(r) for r in ranks(pooled)[0]) <= 3
    for cache in (per_layer, pooled):
        assert abs(stored_vs_budget(cache) - 1) <= 0.02
    # Per layer each layer holds its own budget; pooled, only the total does.
    stats = pooled.memory_stats().per_layer
    assert stats[1].aged_stored_bytes > 1.5 * stats[0].aged_stored_bytes


def test_pooled_relative_error_is_lower_in_total() -> None:
    layers = [states("steep", seed=3), states("flat", seed=4), states("flat", seed=5)]

    def total_error(cache: ChunkedSVDCache) -> float:
        err = 0.0
        for layer, (k, v) in zip(cache.layers, layers):
            rk, rv = layer.reconstruct_compressed()
            n = rk.shape[-2]
            s = layer.sink_length
            for x, r in ((k, rk), (v, rv)):
                ref = x[..., s : s + n, :]
                err += float((r - ref).norm() ** 2 / ref.norm() ** 2)
        return err

    per_layer = total_error(compressed(CompressionConfig(**BASE, key_weight=1.0), layers))
    pooled = total_error(
        compressed(CompressionConfig(**BASE, key_weight=1.0, rank_allocation="pooled"), layers)
    )
    assert pooled < 0.9 * per_layer


@pytest.mark.parametrize("rho", [0.5, 0.25, 0.125])
def test_pooled_bytes_meet_the_budget_on_a_model(rho) -> None:
    model = build(LlamaForCausalLM, LlamaConfig(**{**DECODER, "num_hidden_layers": 4}, **COMMON))
    cfg = CompressionConfig(**{**BASE, "chunk_size": 16, "compression_ratio": rho}, rank_allocation="pooled")
    cache = ChunkedSVDCache.from_model(model, cfg)
    ids = random_ids(300, seed=7)
    kw = {cache_kwarg_name(model): cache, "use_cache": True}
    with torch.no_grad():
        model(input_ids=ids[:, :200], **kw)
        for t in range(200, 300):  # decoding: one chunk per layer ages out together every 16 tokens
            model(input_ids=ids[:, t : t + 1], **kw)
    cache.compress_all()
    assert abs(stored_vs_budget(cache) - 1) <= 0.02
    per_layer_ratio = [s.aged_stored_bytes / s.aged_reference_bytes for s in cache.memory_stats().per_layer]
    assert max(per_layer_ratio) - min(per_layer_ratio) > 0.01 * rho  # the split differs from layer to layer


@pytest.mark.parametrize("allocation", ["per_layer", "pooled"])
def test_head_weights_move_rank_to_the_weighted_head(allocation) -> None:
    layers = [states("flat", seed=8)] * 2
    plain = ranks(compressed(CompressionConfig(**BASE, rank_allocation=allocation), layers))
    # Layer 1's second key head weighs 4× the others.
    weights = [[[1.0, 1.0], [1.0, 1.0]], [[1.0, 4.0], [1.0, 1.0]]]
    cfg = CompressionConfig(**BASE, rank_allocation=allocation, head_weights=weights)
    weighted = ranks(compressed(cfg, layers))
    key_head = lambda r, layer: sum(c[1] for c in r[layer])  # noqa: E731
    assert key_head(weighted, 1) > key_head(plain, 1)
    if allocation == "per_layer":  # layer 0 keeps its own budget and weights
        assert weighted[0] == plain[0]
    else:  # the bytes come from the other layer too
        assert sum(map(sum, weighted[0])) < sum(map(sum, plain[0]))


def test_head_weights_must_match_the_model() -> None:
    with pytest.raises(ValueError, match="head_weights gives 1 layers"):
        ChunkedSVDCache(CompressionConfig(head_weights=[[[1.0, 1.0], [1.0, 1.0]]]), num_layers=2)
    cache = ChunkedSVDCache(CompressionConfig(**BASE, head_weights=[[[1.0] * 3, [1.0] * 3]]), num_layers=1)
    with pytest.raises(ValueError, match="head_weights gives 3 weights"):
        cache.update(*states("flat"), 0)


@pytest.fixture(scope="module")
def calibration_model() -> LlamaForCausalLM:
    return build(LlamaForCausalLM, LlamaConfig(**{**DECODER, "num_hidden_layers": 3}, **COMMON))


def test_head_sensitivity_weights(calibration_model) -> None:
    model = copy.deepcopy(calibration_model)
    ids = random_ids(200, seed=9)[0]
    kw = dict(starts=(0, 40), context_len=96, continuation_len=48, num_sink_tokens=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = head_sensitivity(model, ids, power=1.0, **kw)
    assert [[len(k), len(v)] for k, v in weights] == [[2, 2]] * 3
    # Normalised per kind over all heads, so key_weight keeps its meaning.
    for kind in (0, 1):
        mean = sum(sum(w[kind]) for w in weights) / 6
        assert mean == pytest.approx(1.0)
    # Untouched model: same weights, no gradient left behind.
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in model.named_parameters())
    damped = head_sensitivity(model, ids, power=0.5, **kw)
    assert damped[0][0][0] == pytest.approx(weights[0][0][0] ** 0.5)
    # A layer whose attention output is cut off cannot affect the loss through its cache.
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    cut = head_sensitivity(model, ids, power=1.0, **kw)
    assert max(cut[1][0] + cut[1][1]) < 1e-5
    assert min(cut[0][0] + cut[2][0] + cut[0][1] + cut[2][1]) > 1e-3
