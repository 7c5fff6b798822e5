"""`PackedFactors`: the batched rebuild equals the chunk-by-chunk one, and packing holds no byte twice."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.backends import cpu_kernel as kernels
from chunked_decomp.core.factors import FactorCodec, FactorSet, SharedRows, take_rank
from chunked_decomp.core.packed import PackedFactors
from chunked_decomp.core.quantization import unpack_codes
from chunked_decomp.core.rotary import rotate
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import make_tiny_model, random_ids

BATCH, HEADS, DIM = 2, 3, 16


def _sets(lengths, ranks, codec: FactorCodec, seed: int = 0) -> list[FactorSet]:
    """One FactorSet per chunk; ranks[i][h] is the rank of head h in chunk i (0 = nothing stored)."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for length, rs in zip(lengths, ranks):
        k = min(length, DIM)
        token = torch.randn(BATCH, HEADS, k, length, generator=g)
        channel = torch.randn(BATCH, HEADS, k, DIM, generator=g)
        pairs = []
        for h, r in enumerate(rs):
            t_enc, c_enc = codec.encode(token[:, h].contiguous(), channel[:, h].contiguous())
            pairs.append((take_rank(t_enc, r), take_rank(c_enc, r)))
        sets.append(FactorSet(pairs, BATCH, length, HEADS, DIM, joined=False))
    return sets


def _slow(sets: list[FactorSet]) -> torch.Tensor:
    return torch.cat([s.reconstruct(torch.float32) for s in sets], dim=-2)


CODECS = {
    "int4": FactorCodec(True, 4, 4, 8, torch.float16),
    "int2_int8": FactorCodec(True, 2, 8, 8, torch.float16),
    "float16": FactorCodec(False, 4, 4, 8, torch.float16),
}
LAYOUTS = {
    # (chunk lengths, ranks per chunk and head)
    "equal_lengths": ([16, 16, 16], [[4, 2, 7], [1, 5, 3], [16, 16, 16]]),
    "runs_with_partial_groups_and_bytes": (
        [13, 13, 12, 16, 16, 7],
        [[3, 1, 2]] * 3 + [[5, 4, 1]] * 2 + [[2, 7, 0]],
    ),
    "a_head_with_rank_zero": ([16, 16], [[0, 3, 2], [4, 0, 0]]),
}


@pytest.mark.parametrize(
    "fused", [pytest.param(True, marks=pytest.mark.needs_cpu_kernel), False], ids=["kernel", "pytorch"]
)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_rebuild_equals_chunk_by_chunk(codec, layout, fused, monkeypatch) -> None:
    """The rebuild dequantises each run's rows into a zero-padded buffer: with the fused CPU kernel when it is
    built, else with PyTorch operations; both must equal rebuilding chunk by chunk."""
    if fused and not kernels.available():
        pytest.skip("the fused kernel could not be built here")
    if not fused:
        monkeypatch.setattr(kernels, "built", lambda: False)
    lengths, ranks = LAYOUTS[layout]
    _assert_packs_exactly(_sets(lengths, ranks, CODECS[codec]))


def _assert_packs_exactly(sets: list[FactorSet]) -> None:
    """Packing rebuilds what the chunks rebuild one by one, and leaves their values and byte count as they were
    (the chunks then view the packed buffers)."""
    before = _slow(sets)
    nbytes = sum(s.nbytes for s in sets)
    packed = PackedFactors(sets)
    # The rebuild's buffers start uninitialised (filled with NaN here): every row a factor does not write must
    # be zeroed, or it spoils the products.
    real_empty = torch.empty
    with mock.patch.object(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))):
        got = packed.reconstruct()
    torch.testing.assert_close(got, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_slow(sets), before, rtol=0, atol=0)
    assert sum(s.nbytes for s in sets) == nbytes


def test_rank_zero_everywhere_rebuilds_zeros() -> None:
    sets = _sets([16, 16], [[0, 0, 0], [0, 0, 0]], CODECS["int4"])
    out = PackedFactors(sets).reconstruct()
    assert out.shape == (BATCH, HEADS, 32, DIM) and not out.any()


def test_layouts_it_does_not_pack_are_refused() -> None:
    sets = _sets([16], [[2, 2, 2]], CODECS["int4"])
    assert PackedFactors.supports(sets)
    joined = FactorSet(sets[0].pairs[:1], BATCH, 16, HEADS, DIM, joined=True)
    assert not PackedFactors.supports([joined])
    # A shared basis is packed when every chunk of a head uses that head's basis, not a copy or its own.
    bases = [torch.eye(DIM) for _ in range(HEADS)]
    shared = FactorSet(
        [(t, SharedRows(b, 2)) for (t, _), b in zip(sets[0].pairs, bases)],
        BATCH,
        16,
        HEADS,
        DIM,
        joined=False,
    )
    assert PackedFactors.supports([shared, shared])
    copied = FactorSet(
        [(t, SharedRows(b.clone(), 2)) for (t, _), b in zip(sets[0].pairs, bases)],
        BATCH,
        16,
        HEADS,
        DIM,
        False,
    )
    assert not PackedFactors.supports([shared, copied])
    assert not PackedFactors.supports([shared, sets[0]])
    assert not PackedFactors.supports([])
    with pytest.raises(ValueError, match="per-head"):
        PackedFactors([joined])


@pytest.mark.parametrize("corrections", [False, True], ids=["shared_rows", "with_own_rows"])
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_rebuild_with_a_shared_basis_equals_chunk_by_chunk(codec, layout, corrections) -> None:
    """Token factors packed, each head's basis rows (more than any chunk keeps) used by all its chunks; with
    corrections, a chunk's own rows follow the shared rows it keeps (half its rank here)."""
    lengths, ranks = LAYOUTS[layout]
    enc = CODECS[codec]
    g = torch.Generator().manual_seed(3)
    bases = [enc.encode_basis(torch.randn(DIM, DIM, generator=g)) for _ in range(HEADS)]
    own = enc.encode(torch.randn(BATCH, DIM, 8, generator=g), torch.randn(BATCH, DIM, DIM, generator=g))[1]
    sets = []
    for s, rs in zip(_sets(lengths, ranks, enc), ranks):
        pairs = []
        for h, ((t, _), r) in enumerate(zip(s.pairs, rs)):
            extra = r - r // 2 if corrections and r >= 2 else 0
            c = SharedRows(bases[h], r - extra, take_rank(own, extra)) if extra else SharedRows(bases[h], r)
            pairs.append((t, None if t is None else c))
        sets.append(FactorSet(pairs, BATCH, s.length, HEADS, DIM, joined=False))
    assert corrections == any(p[1].extra is not None for s in sets for p in s.pairs if p[1] is not None)
    _assert_packs_exactly(sets)


def test_a_shared_basis_is_decoded_at_each_rebuild_and_not_kept() -> None:
    """The decoded basis is a float32 copy of rows the layer stores at 4 bits, so it is not kept: two rebuilds give
    the same floats, and what the packed object holds besides the factors is its int32 table (8 words a factor)."""
    enc = CODECS["int4"]
    g = torch.Generator().manual_seed(5)
    bases = [enc.encode_basis(torch.randn(DIM, DIM, generator=g)) for _ in range(HEADS)]
    lengths, ranks = LAYOUTS["equal_lengths"]
    sets = [
        FactorSet([(t, SharedRows(bases[h], r)) for h, ((t, _), r) in enumerate(zip(s.pairs, rs))], BATCH,
                  s.length, HEADS, DIM, joined=False)
        for s, rs in zip(_sets(lengths, ranks, enc), ranks)
    ]  # fmt: skip
    packed = PackedFactors(sets)
    first = packed.reconstruct()
    torch.testing.assert_close(packed.reconstruct(), first, rtol=0, atol=0)
    factors = sum(1 for s in sets for t, _ in s.pairs if t is not None)
    assert packed.overhead_nbytes == factors * 8 * 4
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in vars(packed).values())


@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_codes_inverts_packing_by_hand(bits) -> None:
    per = 8 // bits
    codes = torch.arange(4 * per, dtype=torch.uint8) % (1 << bits)
    packed = torch.tensor(
        [sum(int(codes[i * per + j]) << (j * bits) for j in range(per)) for i in range(4)], dtype=torch.uint8
    )
    assert torch.equal(unpack_codes(packed, bits, codes.numel()), codes)


def test_cache_uses_the_packed_path_and_it_survives_crop_and_reorder() -> None:
    """Through a real cache: the packed rebuild equals the chunk-by-chunk one after compression, crop and
    batch reordering (each invalidates and rebuilds the packing)."""
    model = make_tiny_model("llama")
    cfg = CompressionConfig(
        compression_ratio=0.25, chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8
    )
    cache = ChunkedSVDCache.from_model(model, cfg)
    ids = random_ids(70, seed=3).repeat(2, 1)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg_name(model): cache})

    def check() -> None:
        for layer in cache.layers:
            keys, values = layer.reconstruct_compressed()
            assert layer.store._packed, "expected the packed path for per-head quantised chunks"
            slow_v = torch.cat([c.values.reconstruct(torch.float32) for c in layer.chunks], dim=-2)
            torch.testing.assert_close(values, slow_v, rtol=1e-5, atol=1e-5)
            # Keys chunk by chunk, each rotated to its own positions (not through the batched rotation).
            slow_k = torch.cat(
                [
                    rotate(
                        c.keys.reconstruct(torch.float32),
                        torch.arange(c.start, c.start + c.length),
                        layer.store.inv_freq,
                    )
                    for c in layer.chunks
                ],
                dim=-2,
            )
            torch.testing.assert_close(keys, slow_k, rtol=1e-5, atol=1e-5)

    check()
    cache.crop(-13)
    check()
    cache.reorder_cache(torch.tensor([1, 0]))
    check()
