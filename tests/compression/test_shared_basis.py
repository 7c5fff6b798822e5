"""basis_sharing="layer" and key_weight: one basis per layer, chunks store only their coefficients."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.core.factors import SharedRows
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import tiny_llama


def _no_exact_tokens(**options) -> CompressionConfig:
    """Every token compressed: no sinks, no exact recent window."""
    return CompressionConfig(residual_length=0, num_sink_tokens=0, **options)


def _run(model, cfg: CompressionConfig, ids: torch.Tensor, split: int):
    name = cache_kwarg_name(model)
    cache = ChunkedSVDCache.from_model(model, cfg)
    with torch.no_grad():
        model(ids[:, :split], **{name: cache})
        cache.compress_all()
        logits = model(ids[:, split:], **{name: cache}).logits
    return cache, logits


def _reference(model, ids, split):
    name = cache_kwarg_name(model)
    with torch.no_grad():
        cache = DynamicCache()
        model(ids[:, :split], **{name: cache})
        return model(ids[:, split:], **{name: cache}).logits


@pytest.mark.parametrize("sharing", ["layer", "keys"])
@pytest.mark.parametrize("head_mode", ["per_head", "joined"])
def test_shared_basis_full_rank_is_exact(head_mode: str, sharing: str) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(1))
    cfg = CompressionConfig(
        chunk_size=16,
        residual_length=8,
        basis_sharing=sharing,
        head_mode=head_mode,
        use_quantization=False,
        factor_dtype="float32",
        target_rank=16 if head_mode == "per_head" else 32,  # full rank: head_dim, or 2 heads joined
    )
    cache, logits = _run(model, cfg, ids, 100)
    assert torch.allclose(logits, _reference(model, ids, 100), atol=1e-4)
    layer = cache.layers[0]
    # Every chunk points at its group's stored basis, and stores no channel factor of its own.
    for g, stored in enumerate(layer.store.basis.bases["k"]):
        assert all(c.keys.pairs[g][1].basis is stored for c in layer.chunks)
    values_shared = [isinstance(p[1], SharedRows) for c in layer.chunks for p in c.values.pairs]
    assert all(values_shared) if sharing == "layer" else not any(values_shared)


def test_shared_basis_bytes_counted_once_and_within_budget() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 900), generator=torch.Generator().manual_seed(2))
    # 0.1 of the float32 cache: below what full-rank 4-bit coefficients cost, so the budget binds.
    cfg = CompressionConfig(chunk_size=16, residual_length=8, basis_sharing="layer", compression_ratio=0.1)
    cache, _ = _run(model, cfg, ids, 880)  # the basis is a fixed cost, repaid over the first chunks
    stats = cache.memory_stats()
    assert abs(stats.aged_ratio / 0.1 - 1) < 0.02
    layer = cache.layers[0]
    basis_bytes = sum(b.nbytes for rows in layer.store.basis.bases.values() for b in rows)
    chunk_bytes = sum(c.nbytes for c in layer.chunks)
    sinks = layer.sink_keys.numel() * 4 * 2
    assert layer.memory_stats().aged_stored_bytes == basis_bytes + chunk_bytes + sinks


def test_shared_basis_beats_per_chunk_basis_on_a_stable_subspace() -> None:
    """Keys and values drawn from one fixed 6-dimensional subspace: a per-chunk basis pays for the same basis
    again in every chunk, a shared one pays once, so at equal bytes it keeps more rank and errs less."""
    torch.manual_seed(0)
    b, h, d, n = 1, 2, 16, 512
    basis = torch.linalg.qr(torch.randn(d, 6))[0].T  # (6, d)
    k = torch.randn(b, h, n, 6) @ basis + 0.01 * torch.randn(b, h, n, d)
    v = torch.randn(b, h, n, 6) @ basis + 0.01 * torch.randn(b, h, n, d)
    errors = {}
    for sharing in ("none", "layer"):
        cfg = _no_exact_tokens(chunk_size=16, basis_sharing=sharing, compression_ratio=0.1)
        cache = ChunkedSVDCache(cfg, num_layers=1)
        cache.update(k, v, 0)
        cache.compress_all()
        rk, rv = cache.layers[0].reconstruct_compressed()
        errors[sharing] = float((rk - k).norm() / k.norm() + (rv - v).norm() / v.norm())
        assert cache.memory_stats().aged_ratio <= 0.1 * 1.02
    # Measured: 0.94 (per-chunk bases leave room for ~1 component) vs 0.13 (shared: all 6 kept).
    assert errors["layer"] < 0.5 * errors["none"], errors


def test_key_weight_moves_rank_to_keys() -> None:
    torch.manual_seed(0)
    k = torch.randn(1, 2, 256, 16)
    v = torch.randn(1, 2, 256, 16)
    ranks = {}
    for w in (1.0, 8.0):
        cfg = _no_exact_tokens(chunk_size=64, key_weight=w, compression_ratio=0.08)
        cache = ChunkedSVDCache(cfg, num_layers=1)
        cache.update(k, v, 0)
        cache.compress_all()
        layer = cache.layers[0].memory_stats()
        ranks[w] = (layer.mean_key_rank, layer.mean_value_rank)
    assert ranks[8.0][0] > ranks[1.0][0] and ranks[8.0][1] < ranks[1.0][1], ranks


def test_reset_drops_the_shared_basis() -> None:
    cfg = _no_exact_tokens(chunk_size=16, basis_sharing="layer")
    cache = ChunkedSVDCache(cfg, num_layers=1)
    cache.update(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), 0)
    cache.compress_all()
    assert set(cache.layers[0].store.basis.bases) == {"k", "v"}
    cache.reset()
    assert cache.layers[0].store.basis.bases == {} and cache.get_seq_length() == 0


@pytest.mark.parametrize("bad", ["global", "", None])
def test_basis_sharing_validated(bad) -> None:
    with pytest.raises(ValueError, match="basis_sharing"):
        CompressionConfig(basis_sharing=bad)


@pytest.mark.parametrize("bad", [3, 16, True, "8"])
def test_shared_basis_bits_validated(bad) -> None:
    with pytest.raises(ValueError, match="shared_basis_bits"):
        CompressionConfig(shared_basis_bits=bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_key_weight_validated(bad) -> None:
    with pytest.raises(ValueError, match="key_weight"):
        CompressionConfig(key_weight=bad)


@pytest.mark.parametrize("shared_bits", [None, 8])
def test_shared_basis_is_cut_to_the_ranks_kept_and_counted_in_the_first_span(shared_bits: int | None) -> None:
    """The first span compressed decides the basis: its allocation counts each kept component's basis row
    once, the stored basis holds exactly the rows some chunk keeps (encoded at shared_basis_bits, else
    basis_bits), and the span's bytes fit its budget at once, with no debt left for later chunks to repay."""
    torch.manual_seed(0)
    b, h, d, n = 1, 2, 32, 256
    k = torch.randn(b, h, n, d) * torch.linspace(3, 0.1, d)
    v = torch.randn(b, h, n, d) * torch.linspace(2, 0.1, d)
    cfg = _no_exact_tokens(
        chunk_size=64,
        basis_sharing="layer",
        compression_ratio=0.15,
        key_weight=1.0,
        shared_basis_bits=shared_bits,
    )
    cache = ChunkedSVDCache(cfg, num_layers=1)
    cache.update(k, v, 0)
    cache.compress_all()
    layer = cache.layers[0]
    codec = layer.store.plan.codec
    for kind, sets in (("k", [c.keys for c in layer.chunks]), ("v", [c.values for c in layer.chunks])):
        for g, stored in enumerate(layer.store.basis.bases[kind]):
            ranks = [0 if s.pairs[g][1] is None else s.pairs[g][1].rank for s in sets]  # shared rows kept
            assert stored.shape == (max(ranks), d)
            assert stored.bits == (shared_bits or cfg.basis_bits)
            assert stored.nbytes == max(ranks) * codec.basis_row_cost(d)
            assert 0 < max(ranks) < d  # the budget binds: the basis is cut
    ratio = layer.memory_stats().aged_stored_bytes / (n * 2 * h * d * 4)  # of the float32 cache
    assert 0.15 * 0.97 <= ratio <= 0.15, ratio


@pytest.mark.parametrize("corrections", [False, True])
def test_later_chunks_keep_at_most_the_stored_rows_and_correct_the_rest(corrections: bool) -> None:
    """A later span far from the first one's subspace: its chunks keep at most the stored rows; with
    ``basis_corrections`` they spend the bytes those rows leave on their own components, within the budget and
    with far less error."""
    g = torch.Generator().manual_seed(1)
    cfg = _no_exact_tokens(
        chunk_size=32,
        basis_sharing="layer",
        compression_ratio=0.1,
        basis_corrections=corrections,
    )
    cache = ChunkedSVDCache(cfg, num_layers=1)
    # First span: 4 strong directions out of 16; the later one: 4 others.
    first = 1e-3 * torch.randn(1, 2, 64, 16, generator=g)
    first[..., :4] = torch.randn(1, 2, 64, 4, generator=g)
    later = 1e-3 * torch.randn(1, 2, 64, 16, generator=g)
    later[..., 8:12] = torch.randn(1, 2, 64, 4, generator=g)
    cache.update(first, first.clone(), 0)
    cache.compress_all()
    layer = cache.layers[0]
    rows = [s.shape[-2] for s in layer.store.basis.bases["k"]]
    cache.update(later, later.clone(), 0)
    cache.compress_all()
    assert len(layer.chunks) == 4
    for c in layer.chunks[2:]:
        for p, stored, cap in zip(c.keys.pairs, layer.store.basis.bases["k"], rows):
            assert p[1].basis is stored and p[1].rank <= cap
    assert cache.memory_stats().aged_ratio <= 0.1 * 1.02
    rk, _ = layer.reconstruct_compressed()
    err = float((rk[..., 64:, :] - later).norm() / later.norm())
    if corrections:
        assert all(p[1].extra_rank > 0 for c in layer.chunks[2:] for p in c.keys.pairs)
        assert err < 0.25, err  # measured 0.19
    else:
        assert all(p[1].extra is None for c in layer.chunks for p in c.keys.pairs)
        assert err > 0.5, err  # measured 0.64: the stored rows span little of the later span


def test_chunks_rebuild_the_projection_on_the_stored_rows_even_when_they_are_skew() -> None:
    """A 2-bit basis is far from orthonormal. Chunks must rebuild their tokens projected on the span of the
    stored rows they keep (8-bit coefficients: nearly exactly), not ``x Bᵀ B``, which counts the skew twice."""
    torch.manual_seed(2)
    k = torch.randn(1, 2, 96, 16) * torch.linspace(3, 0.1, 16)
    cfg = _no_exact_tokens(
        chunk_size=32,
        basis_sharing="keys",
        quantization_bits=8,
        basis_bits=2,
        target_rank=6,
        basis_corrections=False,
    )
    cache = ChunkedSVDCache(cfg, num_layers=1)
    cache.update(k, torch.randn(1, 2, 96, 16), 0)
    cache.compress_all()
    layer = cache.layers[0]
    rebuilt = torch.cat([c.keys.reconstruct() for c in layer.chunks], dim=-2)
    for g, stored in enumerate(layer.store.basis.bases["k"]):
        rows = stored.dequantize()[:6]
        assert (rows @ rows.T - torch.eye(6)).abs().max() > 0.05  # skew indeed
        projected = k[0, g] @ torch.linalg.pinv(rows) @ rows
        skew = k[0, g] @ rows.T @ rows
        err = (rebuilt[0, g] - projected).norm() / projected.norm()
        assert err < 0.01, err
        assert (skew - projected).norm() / projected.norm() > 10 * err


def test_keys_share_a_basis_while_values_keep_their_own_and_ranks_per_chunk() -> None:
    """``basis_sharing="keys"``: key chunks keep one rank per head for the span (their rows are the layer's),
    value chunks keep their own channel factors and ranks chosen chunk by chunk (one chunk of values is
    rank 1, the other full rank)."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 64, 16, generator=g) * torch.linspace(3, 0.1, 16)
    v = torch.randn(1, 2, 64, 16, generator=g)
    v[..., :32, :] = torch.randn(1, 2, 32, 1, generator=g) * torch.randn(1, 2, 1, 16, generator=g)
    cfg = _no_exact_tokens(chunk_size=32, basis_sharing="keys", compression_ratio=0.15)
    cache = ChunkedSVDCache(cfg, num_layers=1)
    cache.update(k, v, 0)
    cache.compress_all()
    first, second = cache.layers[0].chunks  # measured: values ranks [1, 1] and [14, 15]
    assert first.keys.ranks == second.keys.ranks
    assert all(isinstance(p[1], SharedRows) for c in (first, second) for p in c.keys.pairs)
    assert not any(isinstance(p[1], SharedRows) for c in (first, second) for p in c.values.pairs)
    assert max(first.values.ranks) <= 2 and min(second.values.ranks) >= 8
    assert "v" not in cache.layers[0].store.basis.bases


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_basis_corrections_validated(bad) -> None:
    with pytest.raises(ValueError, match="basis_corrections"):
        CompressionConfig(basis_corrections=bad)


def test_sharing_options_round_trip_through_a_dict() -> None:
    cfg = CompressionConfig(basis_sharing="keys", basis_corrections=False, shared_basis_bits=8)
    assert CompressionConfig(**cfg.to_dict()) == cfg


def test_corrections_stay_within_a_pooled_budget() -> None:
    """Pooled ranks give one layer bytes the other leaves; corrections may spend only what the pooled allocation
    left in total, not each layer's own slack (measured before the fix: 0.182 of a 0.15 budget)."""
    g = torch.Generator().manual_seed(0)
    cfg = _no_exact_tokens(
        chunk_size=32,
        basis_sharing="keys",
        rank_allocation="pooled",
        compression_ratio=0.15,
    )
    cache = ChunkedSVDCache(cfg, num_layers=2)
    # Layer 0: keys and values spread over all 16 directions; layer 1: rank 2, so it leaves most of its share.
    k0, v0 = torch.randn(1, 2, 128, 16, generator=g), torch.randn(1, 2, 128, 16, generator=g)
    k1 = torch.randn(1, 2, 128, 2, generator=g) @ torch.randn(2, 16, generator=g)
    v1 = torch.randn(1, 2, 128, 2, generator=g) @ torch.randn(2, 16, generator=g)
    cache.update(k0, v0, 0)
    cache.update(k1, v1, 1)
    cache.compress_all()
    assert 0.14 <= cache.memory_stats().aged_ratio <= 0.15 * 1.001


@pytest.mark.parametrize("basis_bits", [4, 8])
def test_first_span_after_many_sinks_pays_its_basis_once(basis_bits: int) -> None:
    """Many exact sinks put the layer in debt past the repayment cap. The first span's allocation pays for
    its basis within the span's budget; the corrections must then spend only what is left of that budget,
    not ask again (where the new basis shows only as more of an already capped debt). Measured before the
    fix: the span stored 5.1 % (4-bit basis) and 9.0 % (8-bit) more than its budget."""
    g = torch.Generator().manual_seed(3)
    b, h, d, sinks, n = 1, 2, 32, 40, 256
    k = torch.randn(b, h, sinks + n, d, generator=g) * torch.linspace(3, 0.1, d)
    v = torch.randn(b, h, sinks + n, d, generator=g) * torch.linspace(2, 0.1, d)
    cfg = CompressionConfig(
        chunk_size=64,
        residual_length=0,
        num_sink_tokens=sinks,
        basis_sharing="keys",
        shared_basis_bits=basis_bits,
        compression_ratio=0.25,
    )
    cache = ChunkedSVDCache(cfg, num_layers=1)
    cache.update(k[..., :sinks, :], v[..., :sinks, :], 0)
    layer = cache.layers[0]
    before = layer.memory_stats().aged_stored_bytes  # the sinks, float32
    budget = layer.store.chunk_budget(n)
    allowance = 0.25 * n * 2 * h * d * 4
    assert budget == pytest.approx(0.75 * allowance)  # the debt is capped at a quarter of the allowance
    cache.update(k[..., sinks:, :], v[..., sinks:, :], 0)
    cache.compress_all()
    assert layer.store.basis.bases["k"] and not layer.store.basis.drafts
    spent = layer.memory_stats().aged_stored_bytes - before
    assert 0.97 * budget <= spent <= budget, (spent, budget)
