"""KV methods behind one interface: byte accounting and prefill, on tiny in-process models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from chunked_decomp.evaluation.methods import (
    ChunkedDecompMethod,
    FullCache,
    chunked_method,
    kv_geometry,
    method_from_spec,
    tensor_nbytes,
)
from chunked_decomp.evaluation.peers import KVPressMethod, QuantizedCacheMethod, kvpress_available
from chunked_decomp.evaluation.perplexity import continuation_perplexity
from tests.helpers.models import make_tiny_model

needs_kvpress = pytest.mark.skipif(
    not kvpress_available(), reason="kvpress not importable (needs transformers<5.3)"
)
HEAD_DIM = 16


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(1))


def _exact_chunked() -> ChunkedDecompMethod:
    from chunked_decomp.config import CompressionConfig

    config = CompressionConfig(
        compression_ratio=1.0, target_rank=HEAD_DIM, use_quantization=False, factor_dtype="float32"
    )
    return ChunkedDecompMethod(config, name="chunked-exact")


def test_kv_geometry(model):
    geometry = kv_geometry(model)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (2, 2, HEAD_DIM)
    # keys + values, 2 layers, 2 heads, 16 dims, 2 bytes
    assert geometry.bytes_per_token(2) == 2 * 2 * 2 * 16 * 2


def test_full_cache_bytes_and_logits(model, ids):
    prefilled = FullCache().prefill(model, ids)
    n = ids.shape[1]
    assert prefilled.context_length == n
    assert prefilled.reference_bytes == n * 256
    assert prefilled.stored_bytes == prefilled.reference_bytes  # ρ = 1 against a 16-bit cache
    assert prefilled.storage.cache_bytes == n * 512  # float32 really held
    assert prefilled.storage.ratio_cache_dtype == 1.0
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(prefilled.last_logits, expected, rtol=1e-5, atol=1e-5)


def test_tensor_nbytes_counts_quanto_packed_storage():
    from optimum.quanto import MaxOptimizer, qint4, quantize_weight

    x = torch.randn(1, 2, 128, 16)
    scale, shift = MaxOptimizer()(x, qint4, 0, 64)
    q = quantize_weight(x, qint4, 0, scale, shift, 64)
    groups = x.numel() // 64
    # two 4-bit values per byte, plus a float32 scale and shift per group of 64
    assert tensor_nbytes(q) == x.numel() // 2 + groups * 4 * 2
    assert tensor_nbytes((x, {"a": x})) == 2 * x.numel() * 4
    assert tensor_nbytes(None) == 0


@pytest.mark.parametrize(("nbits", "expected_ratio"), [(4, 0.3125), (2, 0.1875)])
def test_quantized_cache_bytes(model, ids, nbits, expected_ratio):
    method = QuantizedCacheMethod(nbits=nbits)
    prefilled = method.prefill(model, ids)
    # the whole context is quantised at prefill: nothing left in the full-precision residual
    for layer in prefilled.cache.layers:
        assert layer.keys.numel() == 0 and layer.values.numel() == 0
    full = FullCache().prefill(model, ids)
    assert prefilled.stored_bytes < full.stored_bytes
    # nbits/16 for the data + a float32 scale and shift per 64 values: 8 bytes / (64 * 2 bytes) = 0.0625
    assert prefilled.ratio == pytest.approx(expected_ratio)
    assert prefilled.storage.ratio_cache_dtype == pytest.approx(expected_ratio / 2)


def test_quantized_cache_counts_residual(model, ids):
    method = QuantizedCacheMethod(nbits=4)
    cache = method.new_cache(model)
    with torch.no_grad():
        model(input_ids=ids[:, :128], use_cache=True, **{_kw(model): cache})
        model(input_ids=ids[:, 128:138], use_cache=True, **{_kw(model): cache})  # 10 tokens into the residual
    storage = method.storage(model, cache, 138)
    quantised_only = 128 * 256 * 0.3125
    assert storage.stored_bytes == pytest.approx(quantised_only + 10 * 256)


def _kw(model):
    from chunked_decomp.hf.models import cache_kwarg_name

    return cache_kwarg_name(model)


def test_quantized_cache_validates():
    with pytest.raises(ValueError, match="nbits"):
        QuantizedCacheMethod(nbits=3)
    with pytest.raises(ValueError, match="backend"):
        QuantizedCacheMethod(backend="nope")


def test_method_from_spec():
    assert isinstance(method_from_spec("full"), FullCache)
    q = method_from_spec("quanto2")
    assert isinstance(q, QuantizedCacheMethod) and q.nbits == 2
    assert method_from_spec("quanto:4").nbits == 4
    c = method_from_spec("chunked:balanced@0.125")
    assert isinstance(c, ChunkedDecompMethod)
    assert c.config.compression_ratio == 0.125
    assert c.config.reference_dtype == "float16"
    assert c.name == "chunked:balanced@0.125"
    assert method_from_spec("chunked@0.5").config.compression_ratio == 0.5
    with pytest.raises(ValueError, match="method spec"):
        method_from_spec("gzip")


def test_method_spec_overrides_config_fields():
    """``chunked:PRESET@RATIO,KEY=VALUE,...``: the preset with those fields changed (values read as YAML), named
    with them; a malformed item or a bad value is refused naming it."""
    m = method_from_spec("chunked:aggressive@0.125, basis_sharing=keys,key_weight=6")
    base = method_from_spec("chunked:aggressive@0.125")
    assert m.config.basis_sharing == "keys" and m.config.key_weight == 6.0
    assert base.config.basis_sharing == "none" and base.config.key_weight == 4.0
    assert m.config.rank_allocation == base.config.rank_allocation == "pooled"  # the rest of the preset kept
    assert m.config.compression_ratio == 0.125 and m.config.reference_dtype == "float16"
    assert m.name == "chunked:aggressive@0.125,basis_sharing=keys,key_weight=6"
    with pytest.raises(ValueError, match="KEY=VALUE.*'basis_sharing'"):
        method_from_spec("chunked:aggressive@0.125,basis_sharing")
    with pytest.raises(ValueError, match="basis_sharing"):
        method_from_spec("chunked:aggressive@0.125,basis_sharing=sometimes")


def test_chunked_exact_matches_full_cache(model):
    """Full rank, float32 factors, no quantisation: perplexity through the compressed cache equals the
    uncompressed one (the whole context is factored, not kept exact)."""
    ids = torch.randint(0, 128, (900,), generator=torch.Generator().manual_seed(2))
    method = _exact_chunked()
    prefilled = method.prefill(model, ids[100:612].unsqueeze(0))
    stats = prefilled.cache.memory_stats()
    assert stats.compressed_tokens == 512 - 4  # everything but the sinks
    full = continuation_perplexity(model, FullCache(), ids, context_len=512, continuation_len=128, start=100)
    exact = continuation_perplexity(model, method, ids, context_len=512, continuation_len=128, start=100)
    assert exact.perplexity == pytest.approx(full.perplexity, rel=1e-5)
    low = continuation_perplexity(
        model, chunked_method(target_rank=2, use_quantization=False), ids, 512, 128, start=100
    )
    # The test can tell: on this near-uniform random model rank 2 moves perplexity by ~6e-5, six times the tolerance.
    assert low.perplexity != pytest.approx(full.perplexity, rel=1e-5)


@pytest.mark.parametrize(
    ("budget", "options"),
    [
        (0.5, {"use_quantization": False, "factor_dtype": "float16"}),
        (0.25, {"use_quantization": False, "factor_dtype": "float16"}),
        (0.125, {"use_quantization": False, "factor_dtype": "float16"}),
        (0.25, {}),
        (0.125, {}),
    ],
)
def test_chunked_stored_bytes_match_budget(model, budget, options):
    """The bytes the method reports for the whole compressed context are the budget (the ranks fill it to
    within a few percent). Quantised factors at 0.5 are left out: full rank at 4 bits costs less than that
    for head_dim 16."""
    ids = torch.randint(0, 128, (1, 1024), generator=torch.Generator().manual_seed(3))
    prefilled = chunked_method(None, budget, **options).prefill(model, ids)
    assert budget * 0.97 <= prefilled.ratio <= budget * 1.001
    assert prefilled.stored_bytes == prefilled.cache.memory_stats().stored_bytes
    assert prefilled.reference_bytes == 1024 * 256


@needs_kvpress
def test_kvpress_keep_all_matches_full_cache(model):
    ids = torch.randint(0, 128, (700,), generator=torch.Generator().manual_seed(4))
    full = continuation_perplexity(model, FullCache(), ids, context_len=256, continuation_len=64, start=10)
    kept = continuation_perplexity(
        model, KVPressMethod("knorm", 1.0), ids, context_len=256, continuation_len=64, start=10
    )
    assert kept.perplexity == pytest.approx(full.perplexity, rel=1e-5)
    assert kept.ratio == pytest.approx(1.0)


@needs_kvpress
@pytest.mark.parametrize("press", ["knorm", "snapkv", "streamingllm", "expectedattention", "tova"])
def test_kvpress_keeps_fraction(model, press):
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(5))
    method = method_from_spec(f"kvpress:{press}@0.25")
    assert isinstance(method, KVPressMethod)
    assert method.press.compression_ratio == pytest.approx(0.75)  # kvpress's ratio is the fraction removed
    prefilled = method.prefill(model, ids)
    assert prefilled.cache.get_seq_length() == 64
    assert prefilled.ratio == pytest.approx(0.25)
    assert prefilled.context_length == 256


def test_kvpress_absent_is_a_clear_error():
    if kvpress_available():
        pytest.skip("kvpress is installed here")
    with pytest.raises(ImportError, match="setup_peers_env"):
        KVPressMethod("knorm", 0.5)


def test_evaluation_import_is_light():
    code = (
        "import sys, chunked_decomp.evaluation as e; "
        "heavy = [m for m in ('kvpress', 'optimum', 'pandas', 'matplotlib', 'chunked_decomp.evaluation.perplexity') "
        "if m in sys.modules]; print(heavy); assert not heavy; "
        "assert callable(e.continuation_perplexity)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
