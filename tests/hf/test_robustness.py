"""Bad and awkward inputs (issue 5, items 1-3): each is refused with a message naming the parameter, or handled
by a documented fallback. docs/bad_inputs.md has one row per test id below."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from chunked_decomp import ChunkedDecomp, ChunkedSVDCache, CompressionConfig
from chunked_decomp.hf.layer import ChunkedSVDLayer
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import HEAD_DIM, make_tiny_model, random_ids

SMALL = dict(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8)
EXACT = dict(**SMALL, target_rank=HEAD_DIM, use_quantization=False, factor_dtype="float32")

# (options, text the ValueError must contain): refused when the options are built.
OPTION_ERRORS = [
    pytest.param({"compression_ratio": 0}, "compression_ratio", id="ratio_zero"),
    pytest.param({"compression_ratio": -0.5}, "compression_ratio", id="ratio_negative"),
    pytest.param({"compression_ratio": 1.5}, "compression_ratio", id="ratio_above_one"),
    pytest.param({"compression_ratio": float("nan")}, "compression_ratio", id="ratio_nan"),
    pytest.param({"chunk_size": 0}, "chunk_size", id="chunk_size_zero"),
    pytest.param({"chunk_size": -16}, "chunk_size", id="chunk_size_negative"),
    pytest.param({"chunk_size": 2}, "chunk_size", id="chunk_size_below_minimum"),
    pytest.param({"min_rank_ratio": -0.1}, "min_rank_ratio", id="min_rank_ratio_negative"),
    pytest.param({"min_rank_ratio": 1.2}, "min_rank_ratio", id="min_rank_ratio_above_one"),
    pytest.param({"target_rank": 0}, "target_rank", id="target_rank_zero"),
    pytest.param({"quantization_bits": 3}, "quantization_bits", id="quantization_bits_unsupported"),
    pytest.param({"compresion_ratio": 0.5}, "unknown compression option", id="unknown_option"),
    pytest.param(
        {"enable_gradient_checkpointing": True}, "enable_gradient_checkpointing", id="gradient_checkpointing"
    ),
]


@pytest.mark.parametrize("options, message", OPTION_ERRORS)
def test_bad_option_is_refused(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkedDecomp(**options)
    if "compresion_ratio" not in options:
        with pytest.raises(ValueError, match=message):
            CompressionConfig.from_dict(options)


# (model, options, text): valid on their own, refused by compress_model for this model.
MODEL_ERRORS = [
    pytest.param("gpt2", {"chunk_size": 1024}, "chunk_size", id="chunk_size_longer_than_context_gpt2"),
    pytest.param("llama", {"chunk_size": 4096}, "chunk_size", id="chunk_size_longer_than_context_llama"),
    pytest.param("llama", {"target_rank": HEAD_DIM + 1}, "target_rank", id="target_rank_above_head_dim"),
    pytest.param(
        "llama",
        {"target_rank": 2 * HEAD_DIM + 1, "head_mode": "joined"},
        "target_rank",
        id="target_rank_above_joined",
    ),
    pytest.param("bert", {}, "encoder-only", id="encoder_only_model"),
]


@pytest.mark.parametrize("model_name, options, message", MODEL_ERRORS)
def test_option_too_large_for_the_model_is_refused_at_compress_model(model_name, options, message) -> None:
    model = make_tiny_model(model_name)
    cd = ChunkedDecomp(**options)
    with pytest.raises(ValueError, match=message) as err:
        cd.compress_model(model)
    if "chunk_size" in options:
        limit = 512 if model_name == "gpt2" else model.config.max_position_embeddings
        assert f"({limit} tokens)" in str(err.value)
    assert "forward" not in model.__dict__  # nothing was wired


def test_limits_themselves_are_accepted() -> None:
    gpt2 = make_tiny_model("gpt2")
    ChunkedDecomp(chunk_size=512).restore(ChunkedDecomp(chunk_size=512).compress_model(gpt2))
    llama = make_tiny_model("llama")
    cd = ChunkedDecomp(target_rank=2 * HEAD_DIM, head_mode="joined")
    cd.restore(cd.compress_model(llama))


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown preset 'fastest'.*balanced"):
        ChunkedDecomp.from_preset("fastest")


def test_malformed_yaml_names_the_file(tmp_path) -> None:
    path = tmp_path / "presets.yaml"
    path.write_text("balanced: {compression_ratio: 0.25\n", encoding="utf-8")
    with pytest.raises(ValueError, match="presets.yaml.*not valid YAML"):
        CompressionConfig.from_preset("balanced", path=path)


# ---- data ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["keys", "values"])
def test_non_finite_keys_or_values_raise_a_clear_error(bad, where) -> None:
    cache = ChunkedSVDCache(CompressionConfig(**SMALL), num_layers=1)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    (k if where == "keys" else v)[0, 1, 12, 3] = bad
    with pytest.raises(
        ValueError, match=r"layer 0: keys or values contain NaN or inf at cache positions 2\.\."
    ) as err:
        cache.update(k, v, 0)
    assert "cannot be compressed" in str(err.value)


def test_non_finite_token_in_the_exact_window_passes_through_until_it_ages_out() -> None:
    """Documented fallback: exact tokens are not inspected; the error comes when their chunk is compressed."""
    cache = ChunkedSVDCache(CompressionConfig(**SMALL), num_layers=1)
    cache.update(torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16), 0)
    k = torch.full((1, 2, 1, 16), float("nan"))
    keys, _ = cache.update(k, torch.randn(1, 2, 1, 16), 0)
    assert torch.isnan(keys[..., -1, :]).all()
    # Position 12 lies in the chunk 10..17, compressed once 8 more tokens follow it (at length 26).
    for _ in range(12):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    with pytest.raises(ValueError, match=r"NaN or inf at cache positions 10\.\.17"):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_sequence_shorter_than_one_chunk_works_and_stays_exact(model_name) -> None:
    model = make_tiny_model(model_name)
    ids = random_ids(5, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    cd = ChunkedDecomp(compression_ratio=0.1, **SMALL)
    with cd.applied(model), torch.no_grad():
        assert torch.equal(model(ids, use_cache=True).logits, ref)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert cd.memory_report()["compressed_tokens"] == 0
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False))
    # A one-token sequence too.
    cache = ChunkedSVDCache.from_model(model, CompressionConfig(**SMALL))
    with torch.no_grad():
        one = model(input_ids=ids[:, :1], **{cache_kwarg_name(model): cache}, use_cache=True).logits
        assert torch.equal(one, model(ids[:, :1]).logits)
    assert cache.get_seq_length() == 1


def test_mixed_lengths_with_left_padding_at_reduced_budget() -> None:
    model = make_tiny_model("llama")
    rows = [random_ids(n, seed=n)[0] for n in (60, 21)]
    batch = torch.zeros(2, 60, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, 60 - len(r) :], mask[i, 60 - len(r) :] = r, 1
    cd = ChunkedDecomp(compression_ratio=0.25, **SMALL)
    with cd.applied(model):
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    layer = cd.last_cache.layers[0]
    assert out.shape == (2, 66)
    assert layer.store.sink_region == 2 + 39  # the longest padding stays exact, in front of the real sinks
    assert layer.sink_length == 41 and layer.chunks
    # The short row sees only its own tokens: its padded prefix is exact, so at full rank it equals running alone.
    exact = ChunkedDecomp(**EXACT)
    with exact.applied(model):
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = model.generate(rows[1][None], max_new_tokens=6, do_sample=False)
    assert torch.equal(out[1, 60:], alone[0, 21:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_half_precision_caches(dtype, model_name) -> None:
    model = make_tiny_model(model_name, dtype=dtype)
    ids = random_ids(81, seed=2)
    name = cache_kwarg_name(model)

    def run(cache):
        with torch.no_grad():
            model(input_ids=ids[:, :80], **{name: cache}, use_cache=True)
            return model(input_ids=ids[:, 80:], **{name: cache}, use_cache=True).logits.float()

    ref_cache = DynamicCache(config=model.config)
    ref = run(ref_cache)
    # Full rank: factoring happens in float32, so the rebuilt keys equal the cached half-precision keys up to one
    # rounding back to the cache dtype (factoring in half precision would be off by ~1e-2).
    exact = ChunkedSVDCache.from_model(model, CompressionConfig(**EXACT))
    got = run(exact)
    layer = exact.layers[0]
    assert isinstance(layer, ChunkedSVDLayer) and layer.chunks
    keys, values = layer.full_states()
    assert keys.dtype == dtype and values.dtype == dtype
    eps = torch.finfo(dtype).eps
    k_ref = ref_cache.layers[0].keys.float()
    assert (keys.float() - k_ref).abs().max() <= eps * k_ref.abs().max()
    assert (got - ref).abs().max() <= 8 * eps * ref.abs().max()
    # Reduced budget: finite and close to the uncompressed logits.
    reduced = ChunkedSVDCache.from_model(model, CompressionConfig(**SMALL, compression_ratio=0.25))
    got = run(reduced)
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 0.5
    assert reduced.memory_stats().aged_ratio == pytest.approx(0.25, abs=0.03)
