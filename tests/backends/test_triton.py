"""The Triton kernel for attention over quantised factors (`chunked_decomp.backends.triton`).

Without a GPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), which executes the same
kernel program by program: these tests check its arithmetic (dequantisation, the query projected into each chunk's
basis, keys rotated on chip, the running softmax, the merge with the exact tokens) against attention over the
rebuilt states, and the model's logits against the rebuild path. Timings need a GPU
(``benchmarks/gpu_attention.py``).
"""

from __future__ import annotations

import pytest
import torch

from chunked_decomp import ChunkedSVDCache, CompressionConfig
from chunked_decomp.backends import triton as triton_attention
from chunked_decomp.backends.dispatch import attend
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import make_tiny_model, random_ids, stepwise_logits

pytestmark = [
    pytest.mark.needs_triton,
    pytest.mark.skipif(triton_attention.triton is None, reason="triton is not installed"),
]

BASE = dict(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8, compression_ratio=0.25)


@pytest.fixture
def triton_on(monkeypatch):
    monkeypatch.setenv("CHUNKED_DECOMP_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _compressed_layer(
    pre_rope: bool,
    bits: int = 4,
    basis_bits: int = 4,
    batch: int = 2,
    seed: int = 5,
    tokens: int = 70,
    model=None,
    compress_all: bool = True,
    **extra,
):
    model = make_tiny_model("llama") if model is None else model
    config = CompressionConfig(
        **{**BASE, **extra}, compress_keys_pre_rope=pre_rope, decode_attention="factored", quantization_bits=bits,
        basis_bits=basis_bits,
    )  # fmt: skip
    cache = ChunkedSVDCache.from_model(model, config)
    ids = random_ids(tokens, batch=batch, seed=seed)
    with torch.no_grad():
        model(input_ids=ids, **{cache_kwarg_name(model): cache}, use_cache=True)
    if compress_all:
        cache.compress_all()
    return cache.layers[1]


def _reference(query, keys, values, allowed, scale):
    rep = query.shape[1] // keys.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.double(), keys.double().repeat_interleave(rep, 1), values.double().repeat_interleave(rep, 1),
        attn_mask=allowed, scale=scale,
    )  # fmt: skip
    return out.transpose(1, 2).float()


@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("bits, basis_bits", [(4, 4), (2, 4), (8, 8)])
@pytest.mark.parametrize("q_len", [1, 3])
def test_kernel_equals_attention_over_the_rebuilt_states(
    pre_rope, bits, basis_bits, q_len, triton_on
) -> None:
    """Batch 2, grouped heads (2 query heads per KV head), chunks of 8 and a final partial chunk of 4 (shorter
    than a group), causal queries: the kernel's output is softmax attention over the rebuilt keys and values."""
    layer = _compressed_layer(pre_rope, bits, basis_bits)
    assert {c.length for c in layer.chunks} == {8, 4}
    assert all(c.keys_pre_rope == pre_rope for c in layer.chunks)
    ctx = layer.factored_context()
    assert ctx.triton and (ctx.rope is not None) == pre_rope and ctx.keys is None
    query = torch.randn(2, 4, q_len, 16, generator=torch.Generator().manual_seed(6)) * 3
    got = attend(query, ctx, None, 0.25)
    keys, values = layer.full_states()
    length = keys.shape[-2]
    allowed = torch.arange(length)[None, :] <= torch.arange(length - q_len, length)[:, None]
    want = _reference(query, keys, values, allowed, 0.25)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("sharing, shared_bits", [("keys", None), ("keys", 8), ("layer", None)])
def test_kernel_reads_a_basis_shared_by_the_layer(pre_rope, sharing, shared_bits, triton_on) -> None:
    """Keys (and with ``layer`` values too) on one basis per head for all chunks: every factor of a head, and every
    batch row, reads the same rows (at ``shared_basis_bits`` when set); the output is attention over the rebuilt
    states, batch of 2, the chunks of one prefill (one span: no correction rows, see the next test)."""
    layer = _compressed_layer(
        pre_rope, compress_all=False, basis_sharing=sharing, shared_basis_bits=shared_bits
    )
    packed = layer.store.packed()
    assert packed[0].channel_shared and packed[1].channel_shared == (sharing == "layer")
    assert packed[0].quantized and packed[1].quantized
    assert packed[0].kernel_channel.bits == (shared_bits or 4)
    ctx = layer.factored_context()
    assert ctx.triton and (ctx.rope is not None) == pre_rope and ctx.keys is None
    query = torch.randn(2, 4, 2, 16, generator=torch.Generator().manual_seed(7)) * 3
    keys, values = layer.full_states()
    length = keys.shape[-2]
    allowed = torch.arange(length)[None, :] <= torch.arange(length - 2, length)[:, None]
    want = _reference(query, keys, values, allowed, 0.25)
    torch.testing.assert_close(attend(query, ctx, None, 0.25), want, atol=2e-5, rtol=1e-4)


def test_a_shared_basis_with_correction_rows_keeps_the_pytorch_path(triton_on) -> None:
    """Chunks compressed after the first span add their own rows to the shared ones (here the values' last chunks,
    compressed by ``compress_all``), which the kernel does not read: such a layer is attended by the PyTorch path,
    with the same result."""
    layer = _compressed_layer(False, basis_sharing="layer")
    packed = layer.store.packed()
    assert packed[1].extra is not None and not packed[1].quantized
    ctx = layer.factored_context()
    assert not ctx.triton
    query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(3))
    keys, values = layer.full_states()
    want = _reference(query, keys, values, None, 0.25)
    torch.testing.assert_close(attend(query, ctx, None, 0.25), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pre_rope", [False, True])
@pytest.mark.parametrize("group, bits", [(64, 4), (32, 4), (64, 2)])
def test_chunks_longer_than_a_token_block(pre_rope, group, bits, triton_on) -> None:
    """96-token chunks are read in two blocks of 64 tokens (the second one part masked), the running softmax and
    the value coefficients carried from block to block. Groups of 64 at 4 bits take the block reader (one scale per
    row, two codes per byte); groups of 32 and 2-bit codes the general one."""
    layer = _compressed_layer(pre_rope, bits=bits, tokens=250, chunk_size=96, quant_group_size=group)
    assert [c.length for c in layer.chunks] == [96, 96, 56]
    ctx = layer.factored_context()
    query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    keys, values = layer.full_states()
    want = _reference(query, keys, values, None, 0.25)
    torch.testing.assert_close(attend(query, ctx, None, 0.25), want, atol=2e-5, rtol=1e-4)
    # Attention is blind to a consistent shuffle of tokens; a mask that ends mid-pair is not.
    mask = torch.ones(2, 1, 1, keys.shape[-2], dtype=torch.bool)
    mask[1, ..., :15] = False
    want = _reference(query, keys, values, mask, 0.25)
    torch.testing.assert_close(attend(query, ctx, mask, 0.25), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("group", [32, 64])
def test_full_rotary_head_dim_64_rebuilds_keys_in_halves(group, triton_on) -> None:
    """head_dim 64 rotated over every channel (as Llama, Qwen and Mistral are): the kernel rebuilds each key's two
    halves from the halves of the chunk's basis (each one group at groups of 32, half a group at 64) and rotates
    them on chip, without the channel permutation of the general route."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.models import build

    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=None)  # fmt: skip
    model = build(LlamaForCausalLM, config)
    layer = _compressed_layer(
        pre_rope=True, tokens=170, chunk_size=64, quant_group_size=group, model=model, batch=1
    )
    assert [c.length for c in layer.chunks] == [64, 64, 40] and layer.chunks[0].keys.ranks[0] > 1
    ctx = layer.factored_context()
    assert ctx.triton
    query = torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(1)) * 2
    keys, values = layer.full_states()
    want = _reference(query, keys, values, None, 0.125)
    torch.testing.assert_close(attend(query, ctx, None, 0.125), want, atol=2e-5, rtol=1e-4)


def test_kernel_applies_a_padding_mask_in_every_region(triton_on) -> None:
    """A boolean mask hiding tokens in the sinks, in the compressed chunks and in the tail, for one row only."""
    layer = _compressed_layer(pre_rope=True)
    ctx = layer.factored_context()
    keys, values = layer.full_states()
    length = keys.shape[-2]
    mask = torch.ones(2, 1, 2, length, dtype=torch.bool)
    mask[1, :, :, :13] = False  # sinks and the first compressed chunks of row 1
    mask[0, :, 1, length - 3] = False  # one tail token, for the second query of row 0
    query = torch.randn(2, 4, 2, 16, generator=torch.Generator().manual_seed(2))
    got = attend(query, ctx, mask, 0.25)
    want = _reference(query, keys, values, mask, 0.25)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attend(query, ctx, additive, 0.25), got, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pre_rope", [False, True])
def test_logits_equal_the_rebuild_path(pre_rope, monkeypatch) -> None:
    """Prefill, single-token decoding and multi-token continuations through the model: the Triton path gives the
    logits of rebuilding the same compressed cache, with left padding in a batch of 2."""
    model = make_tiny_model("llama")
    ids = random_ids(66, batch=2, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    steps = [50] + [1] * 6 + [7, 3]
    common = dict(BASE, compress_keys_pre_rope=pre_rope)
    ref = stepwise_logits(model, CompressionConfig(**common), ids, steps, mask)
    monkeypatch.setenv("CHUNKED_DECOMP_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = triton_attention.attention
    monkeypatch.setattr(triton_attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = stepwise_logits(model, CompressionConfig(**common, decode_attention="factored"), ids, steps, mask)
    assert len(calls) >= 2 * 8  # every layer of every step after the first compression
    real_rows = mask.bool()
    torch.testing.assert_close(got[real_rows], ref[real_rows], atol=2e-4, rtol=1e-4)


def test_usable_only_where_asked(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("CHUNKED_DECOMP_TRITON", raising=False)
    assert not triton_attention.usable(torch.device("cpu"))  # the CPU has the C++ kernel
    monkeypatch.setenv("CHUNKED_DECOMP_TRITON", "1")
    assert triton_attention.usable(torch.device("cpu"))
    assert triton_attention.usable(torch.device("cuda"))
    monkeypatch.setenv("CHUNKED_DECOMP_TRITON", "0")
    assert not triton_attention.usable(torch.device("cuda"))
    monkeypatch.setenv("CHUNKED_DECOMP_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_attention.usable(torch.device("cpu"))
    # Without the env flag the CPU keeps the C++ kernel or the PyTorch path.
    monkeypatch.delenv("CHUNKED_DECOMP_TRITON")
    layer = _compressed_layer(pre_rope=False)
    assert not layer.factored_context().triton


def test_head_dim_must_be_a_power_of_two(triton_on) -> None:
    layer = _compressed_layer(pre_rope=False)
    ctx = layer.factored_context()
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        triton_attention.attention(
            torch.randn(2, 2, 2, 24), ctx.key_packed, ctx.value_packed, ctx.tail_keys, ctx.tail_values, 0.25
        )


def test_a_mask_of_the_wrong_length_is_refused_on_both_paths(monkeypatch) -> None:
    layer = _compressed_layer(pre_rope=True)
    query = torch.randn(2, 4, 1, 16)
    length = layer.full_states()[0].shape[-2]
    mask = torch.ones(2, 1, 1, length - 1, dtype=torch.bool)
    for flag in ("1", "0"):
        monkeypatch.setenv("CHUNKED_DECOMP_TRITON", flag)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ctx = layer.factored_context()
        assert ctx.triton == (flag == "1")
        with pytest.raises(ValueError, match=f"covers {length - 1} positions but the cache holds {length}"):
            attend(query, ctx, mask, 0.25)


def test_offsets_are_32_bit_unless_a_buffer_needs_64() -> None:
    from types import SimpleNamespace

    def packed(n: int):
        t = SimpleNamespace(numel=lambda: n)
        f = SimpleNamespace(codes=t, scale=t, minimum=t)
        return SimpleNamespace(token=f, kernel_channel=f)

    assert triton_attention._index_dtype(packed(10), packed(2**31 - 1)) == torch.int32
    assert triton_attention._index_dtype(packed(10), packed(2**31)) == torch.int64


def test_a_fast_route_that_fails_to_compile_falls_back_to_the_general_one(
    triton_on, monkeypatch, caplog
) -> None:
    """4-bit post-RoPE keys in groups of 64 take the folded-scale route; if it fails to compile (checked on one GPU
    and triton only), the kernel warns once and answers through the general route, with the same attention."""
    layer = _compressed_layer(False, tokens=250, chunk_size=96, quant_group_size=64)
    ctx = layer.factored_context()
    query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(1)) * 3
    keys, values = layer.full_states()
    want = _reference(query, keys, values, None, 0.25)
    real = triton_attention._partials_kernel
    routes = []

    class Broken:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                routes.append(kwargs["ALLOW_FAST"])
                if kwargs["ALLOW_FAST"]:
                    raise RuntimeError("simulated compilation failure")
                return real[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(triton_attention, "_partials_kernel", Broken())
    monkeypatch.setattr(triton_attention, "_FAST_FAILED", [])
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(attend(query, ctx, None, 0.25), want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(attend(query, ctx, None, 0.25), want, atol=2e-5, rtol=1e-4)
    assert routes == [True, False, False]  # tried once, then the general route only
    assert "simulated compilation failure" in caplog.text
