"""basis_bits="auto": each layer chooses its keys' and values' channel format from its data, once."""

from __future__ import annotations

import pytest
import torch

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from tests.helpers.storage import held_bytes

BASE = dict(chunk_size=64, residual_length=16, num_sink_tokens=2, quant_group_size=32, basis_bits="auto")


def _states(outliers: bool, seed: int = 0, tokens: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (1, 2, tokens, 32) with a slowly falling spectrum (every component worth some rank); with
    ``outliers``, the keys also carry a large component along one channel (as Qwen2's key bias gives them)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, 33, dtype=torch.float32) ** -0.5
    keys = (
        torch.randn(1, 2, tokens, 32, generator=g)
        @ torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
        * scales
    )
    if outliers:
        spike = torch.zeros(32)
        spike[5] = 30.0
        keys = keys + spike + 0.5 * torch.randn(1, 2, tokens, 1, generator=g) * spike
    values = torch.randn(1, 2, tokens, 32, generator=g) * scales
    return keys, values


def _chosen(outliers: bool, ratio: float) -> tuple:
    cache = ChunkedSVDCache(CompressionConfig(**BASE, compression_ratio=ratio), num_layers=1)
    keys, values = _states(outliers)
    cache.update(keys, values, 0)
    codec = cache.layers[0].store.codec("k")
    return codec.channel_bits, codec.channel_group, cache


def test_keys_with_an_outlier_channel_get_finer_steps_than_keys_without() -> None:
    plain = _chosen(False, 0.1)[:2]
    spiked = _chosen(True, 0.1)[:2]
    assert plain == (4, 32)  # the base format: finer steps would cost rank for nothing
    assert spiked != plain  # 4 bits in groups of 16, or 8 bits


def test_the_choice_is_made_once_and_every_chunk_shares_it() -> None:
    _, _, cache = _chosen(True, 0.2)
    layer = cache.layers[0]
    first = dict(layer.store.codecs)
    keys, values = _states(False, seed=1, tokens=150)  # data without outliers after the choice
    cache.update(keys, values, 0)
    assert layer.store.codecs == first
    bits = {p[1].bits for c in layer.chunks for p in c.keys.pairs if p[1] is not None}
    groups = {p[1].group_size for c in layer.chunks for p in c.keys.pairs if p[1] is not None}
    assert (
        len(layer.chunks) >= 4 and bits == {first["k"].channel_bits} and groups == {first["k"].channel_group}
    )
    assert layer.store.packed() is not None  # one layout: the packed rebuild serves it
    assert held_bytes(cache) == cache.memory_stats().stored_bytes
    assert cache.memory_stats().aged_ratio == pytest.approx(0.2, rel=0.03)


def test_basis_bits_takes_auto_or_bits() -> None:
    assert CompressionConfig(basis_bits="auto").basis_bits == "auto"
    with pytest.raises(ValueError, match="basis_bits must be one of \\(2, 4, 8\\) or 'auto'"):
        CompressionConfig(basis_bits="fine")
    with pytest.raises(ValueError, match="quantization_bits must be one of \\(2, 4, 8\\), got"):
        CompressionConfig(quantization_bits="auto")
