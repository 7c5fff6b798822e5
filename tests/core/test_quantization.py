"""Group-wise quantiser: packing, error bound, byte accounting, prefix slicing (values, not shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunked_decomp.core.factors import FactorCodec
from chunked_decomp.core.quantization import (
    QuantizedTensor,
    pack_codes,
    quantize,
    quantized_nbytes,
    unpack_codes,
)

BITS = (2, 4, 8)


def _storage_bytes(q: QuantizedTensor) -> int:
    """Bytes of the buffers really allocated behind the quantised tensor (views of larger buffers would show)."""
    return sum(t.untyped_storage().nbytes() for t in (q.codes, q.scale, q.minimum))


def _half_step_bound(
    x: torch.Tensor, bits: int, group_size: int, group_dim: int, slack_ulp: float
) -> torch.Tensor:
    """Per element: half the quantisation step of its group, computed from the group's own min and max.

    ``slack_ulp`` adds the rounding of the stored minimum and step to the scale dtype (2**-11 relative for
    float16, ~0 for float32): the minimum can move by half an ulp of |min| and each of the ``levels`` steps by
    half an ulp of the step; below float16's normal range that ulp is absolute (2**-24, so half of it is 2**-25).
    """
    levels = (1 << bits) - 1
    pieces = []
    for g in torch.split(x.float(), group_size, dim=group_dim):
        lo = g.amin(dim=group_dim, keepdim=True)
        hi = g.amax(dim=group_dim, keepdim=True)
        step = (hi - lo) / levels
        subnormal = 2.0**-25 if slack_ulp >= 2.0**-11 else 0.0
        bound = step / 2 + slack_ulp * (lo.abs() + hi.abs() + levels * step) + 1e-6 * step + subnormal + 1e-30
        pieces.append(bound.expand_as(g))
    return torch.cat(pieces, dim=group_dim)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 3, 5, 7, 8, 13, 64, 65])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (3, 2, n), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_codes_hand_computed() -> None:
    # 2 bits, little end first: [1, 2, 3, 0] -> 1 + 2*4 + 3*16 + 0*64 = 57; [3] -> 3 (padded with zeros).
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[57, 3]]
    # 4 bits: [15, 1] -> 15 + 16 = 31.
    assert pack_codes(torch.tensor([15, 1], dtype=torch.uint8), 4).tolist() == [31]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_dim", [-1, -2])
@pytest.mark.parametrize("scale_dtype, slack", [(torch.float32, 1e-7), (torch.float16, 2.0**-11)])
def test_error_at_most_half_a_step_per_group(bits, group_dim, scale_dtype, slack) -> None:
    gen = torch.Generator().manual_seed(bits)
    # Odd sizes so the last group along either dim is shorter; an offset so min rounding matters in float16.
    x = torch.randn(2, 37, 21, generator=gen) * 3 + 0.5
    q = quantize(x, bits, group_size=8, group_dim=group_dim, scale_dtype=scale_dtype)
    err = (q.dequantize() - x).abs()
    bound = _half_step_bound(x, bits, 8, group_dim, slack)
    assert (err <= bound).all(), float((err - bound).max())
    # The bound is tight enough to fail: a quantiser one bit coarser would break it somewhere.
    if bits > 2:
        coarse = quantize(x, bits // 2, group_size=8, group_dim=group_dim, scale_dtype=scale_dtype)
        assert ((coarse.dequantize() - x).abs() > bound).any()


@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_are_exact(bits) -> None:
    x = torch.full((4, 16), 3.25)
    x[2] = -7.5  # a different constant per row
    q = quantize(x, bits, group_size=8, group_dim=-1)
    assert torch.equal(q.dequantize(), x)
    assert torch.equal(q.scale, torch.zeros_like(q.scale))
    z = torch.zeros(3, 5)
    assert torch.equal(quantize(z, bits, group_size=8, group_dim=-2).dequantize(), z)


def test_extremes_of_a_group_are_exact_with_float32_scales() -> None:
    x = torch.tensor([[-2.0, 0.3, 1.7, 6.0]])
    d = quantize(x, 2, group_size=4, group_dim=-1, scale_dtype=torch.float32).dequantize()
    assert d[0, 0].item() == pytest.approx(-2.0, abs=1e-6)
    assert d[0, 3].item() == pytest.approx(6.0, abs=1e-6)
    # 2 bits over [-2, 6]: levels at -2, 2/3, 10/3, 6; 0.3 -> 2/3, 1.7 -> 2/3.
    assert d[0, 1].item() == pytest.approx(2 / 3, abs=1e-6)
    assert d[0, 2].item() == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_returns_the_input_dtype(dtype) -> None:
    x = torch.randn(4, 16).to(dtype)
    d = quantize(x, 8, group_size=8).dequantize()
    assert d.dtype == dtype
    assert torch.allclose(d.float(), x.float(), atol=0.05)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape, group_dim", [((3, 17, 5), -2), ((2, 5, 33), -1), ((1, 9), -1), ((7,), -1)])
def test_nbytes_equals_prediction_and_real_buffers(bits, shape, group_dim) -> None:
    x = torch.randn(shape)
    q = quantize(x, bits, group_size=8, group_dim=group_dim, scale_dtype=torch.float16)
    predicted = quantized_nbytes(shape, bits, 8, group_dim, scale_bytes=2)
    assert q.nbytes == predicted
    assert _storage_bytes(q) == predicted
    # Independent hand count: packed codes per row, plus min and step (2 bytes each) per group.
    lead = math.prod(shape[:-1])
    dim = group_dim % len(shape)
    groups = math.prod(math.ceil(s / 8) if i == dim else s for i, s in enumerate(shape))
    assert predicted == lead * math.ceil(shape[-1] * bits / 8) + 2 * groups * 2


def test_nbytes_hand_computed() -> None:
    # (1, 16, 3) at 4 bits grouped along dim -2 in 8s: codes 16 rows x ceil(3*4/8)=2 bytes = 32;
    # groups 2 x 3 = 6, each min + step in float16 = 4 bytes -> 24. Total 56.
    assert quantized_nbytes((1, 16, 3), 4, 8, -2, 2) == 56
    assert quantize(torch.randn(1, 16, 3), 4, 8, group_dim=-2).nbytes == 56


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", [1, 7, 8, 9, 16, 20])
def test_slice_prefix_equals_quantizing_the_dequantized_prefix(bits, length) -> None:
    x = torch.randn(2, 21, 6, generator=torch.Generator().manual_seed(length))
    q = quantize(x, bits, group_size=8, group_dim=-2, scale_dtype=torch.float32)
    sliced = q.slice_prefix(length)
    full = q.dequantize()
    assert torch.equal(sliced.dequantize(), full[:, :length])
    if length % 8 == 0:
        # Whole groups: each group's dequantised values contain its grid's two ends (codes 0 and 2**bits - 1),
        # so quantising the prefix afresh rebuilds the same grid and the same values. (A truncated last group
        # may have lost its extremes, and a fresh quantisation would pick a finer grid; slicing keeps the old one.)
        again = quantize(full[:, :length], bits, group_size=8, group_dim=-2, scale_dtype=torch.float32)
        assert torch.allclose(again.dequantize(), sliced.dequantize(), atol=1e-5)
        assert torch.allclose(again.scale, sliced.scale, rtol=1e-5)
    assert sliced.nbytes == quantized_nbytes((2, length, 6), bits, 8, -2, 4)
    assert _storage_bytes(sliced) == sliced.nbytes


def test_slice_prefix_refuses_the_packed_dim() -> None:
    q = quantize(torch.randn(2, 16), 4, 8, group_dim=-1)
    with pytest.raises(ValueError, match="packed"):
        q.slice_prefix(4)


def test_index_select_picks_rows() -> None:
    x = torch.randn(4, 16, 8)
    q = quantize(x, 4, 8, group_dim=-2)
    idx = torch.tensor([3, 0, 0])
    assert torch.equal(q.index_select(0, idx).dequantize(), q.dequantize()[idx])


@pytest.mark.parametrize("bad_bits", [0, 1, 3, 16])
def test_bad_bits_and_group_size_raise(bad_bits) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4), bad_bits, 8)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(4), 4, 0)
    with pytest.raises(ValueError, match="dimension"):
        quantize(torch.tensor(1.0), 4, 8)


# ---- properties ---------------------------------------------------------------------------------------------
shapes = st.lists(st.integers(1, 19), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    bits=st.sampled_from(BITS),
    group_size=st.integers(1, 24),
    data=st.data(),
    scale_dtype=st.sampled_from([torch.float16, torch.float32]),
)
def test_property_bytes_as_declared_and_error_bounded(shape, bits, group_size, data, scale_dtype) -> None:
    group_dim = data.draw(st.integers(-len(shape), -1))
    seed = data.draw(st.integers(0, 2**16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4
    q = quantize(x, bits, group_size, group_dim=group_dim, scale_dtype=scale_dtype)
    scale_bytes = torch.empty((), dtype=scale_dtype).element_size()
    declared = quantized_nbytes(shape, bits, group_size, group_dim, scale_bytes)
    assert q.nbytes == declared == _storage_bytes(q)
    slack = 2.0**-11 if scale_dtype == torch.float16 else 1e-7
    err = (q.dequantize() - x).abs()
    assert (err <= _half_step_bound(x, bits, group_size, group_dim, slack)).all()


@settings(max_examples=40, deadline=None)
@given(codes=st.lists(st.integers(0, 255), min_size=1, max_size=70), bits=st.sampled_from(BITS))
def test_property_pack_round_trip(codes, bits) -> None:
    t = torch.tensor([c % (1 << bits) for c in codes], dtype=torch.uint8)
    packed = pack_codes(t, bits)
    assert packed.numel() == math.ceil(len(codes) * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, len(codes)), t)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("t, n, group_size", [(192, 64, 64), (252, 64, 64), (60, 48, 32), (20, 12, 8)])
def test_factor_codec_joint_encoding_equals_two_quantizations(bits, t, n, group_size) -> None:
    # The codec quantises a component's token and channel rows in one call when it can: the codes, scales and
    # minima must be those of quantising each factor on its own.
    torch.manual_seed(bits + t)
    token_t, channel = torch.randn(2, 3, 5, t), torch.randn(2, 3, 5, n) * 7
    codec = FactorCodec(True, bits, bits, group_size, torch.float16)
    enc_t, enc_c = codec.encode(token_t, channel)
    for enc, x in ((enc_t, token_t), (enc_c, channel)):
        ref = quantize(x, bits, group_size, group_dim=-1, scale_dtype=torch.float16)
        assert enc.shape == ref.shape and enc.nbytes == ref.nbytes
        assert torch.equal(enc.codes, ref.codes)
        assert torch.equal(enc.scale, ref.scale) and torch.equal(enc.minimum, ref.minimum)
        assert torch.equal(enc.dequantize(), ref.dequantize())
