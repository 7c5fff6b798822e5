"""Attention over the factors (decode_attention="factored") against the rebuild path, on tiny models.

At reduced rank with quantised factors, the factored attention must give the logits of rebuilding the same
compressed cache and running the model's own attention: same factors, different order of the products.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from chunked_decomp import ChunkedDecomp, ChunkedSVDCache, CompressionConfig
from chunked_decomp.backends import cpu_kernel as kernels
from chunked_decomp.backends import dispatch
from chunked_decomp.backends.context import FactoredContext
from chunked_decomp.backends.dispatch import attend
from chunked_decomp.core.rotary import range_cos_sin, rotate_range
from chunked_decomp.hf import attention as attn_mod
from chunked_decomp.hf.attention import ATTENTION_NAME
from chunked_decomp.hf.models import cache_kwarg_name
from tests.helpers.models import make_tiny_model, random_ids, stepwise_logits

BASE = dict(chunk_size=8, residual_length=8, num_sink_tokens=2, quant_group_size=8, compression_ratio=0.25)


def _counting(monkeypatch) -> list[int]:
    calls = []
    real = dispatch.attend

    def counted(query, ctx, mask, scaling, **kwargs):
        calls.append(query.shape[2])
        return real(query, ctx, mask, scaling, **kwargs)

    monkeypatch.setattr(dispatch, "attend", counted)
    return calls


@pytest.mark.parametrize("model_name", ["llama", "qwen2_hybrid", "gpt2"])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_factored_equals_rebuild_at_reduced_rank(model_name, pre_rope, monkeypatch) -> None:
    model = make_tiny_model(model_name)
    ids = random_ids(96, seed=3)
    steps = [60] + [1] * 20 + [7, 1, 8]  # prefill, decode, multi-token continuations (causal within them)
    common = dict(BASE, compress_keys_pre_rope=pre_rope)
    ref = stepwise_logits(model, CompressionConfig(**common), ids, steps)
    calls = _counting(monkeypatch)
    got = stepwise_logits(model, CompressionConfig(**common, decode_attention="factored"), ids, steps)
    assert calls and max(calls) == 8  # the factored path ran, for single and multi-token steps
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    # Compression is lossy here: the logits are not those of the uncompressed model.
    plain = model(input_ids=ids).logits
    assert (plain[:, 70:] - ref[:, 70:]).abs().max() > 1e-3


def test_factored_with_left_padding_and_joined_heads(monkeypatch) -> None:
    model = make_tiny_model("llama")
    ids = random_ids(70, batch=2, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # second row left-padded by 9
    steps = [50] + [1] * 12 + [8]
    for extra in ({}, {"head_mode": "joined"}):
        ref = stepwise_logits(model, CompressionConfig(**BASE, **extra), ids, steps, mask)
        calls = _counting(monkeypatch)
        got = stepwise_logits(
            model, CompressionConfig(**BASE, **extra, decode_attention="factored"), ids, steps, mask
        )
        assert calls
        # Padded query positions attend to nothing in either path; compare the real ones.
        real = mask.bool()
        torch.testing.assert_close(got[real], ref[real], atol=2e-4, rtol=1e-4)
        monkeypatch.undo()


def test_generate_with_factored_attention_matches_rebuild() -> None:
    model = make_tiny_model("llama")
    ids = random_ids(50, seed=8)
    outs = []
    for mode in ("rebuild", "factored"):
        cd = ChunkedDecomp(**BASE, decode_attention=mode)
        with cd.applied(model):
            outs.append(model.generate(ids, max_new_tokens=24, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_attention_implementation_switched_and_restored() -> None:
    model = make_tiny_model("llama")
    before = model.config._attn_implementation
    assert before != ATTENTION_NAME
    cd = ChunkedDecomp(**BASE, decode_attention="factored")
    with cd.applied(model):
        model.generate(random_ids(40, seed=1), max_new_tokens=2, do_sample=False)
        assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config._attn_implementation == before
    # The rebuild mode leaves the model's attention alone.
    with ChunkedDecomp(**BASE, decode_attention="rebuild").applied(model):
        model.generate(random_ids(40, seed=1), max_new_tokens=2, do_sample=False)
        assert model.config._attn_implementation == before


def test_stand_in_keys_fail_loudly_outside_the_factored_attention() -> None:
    k = torch.randn(1, 2, 5, 4)
    ctx = FactoredContext(
        k[..., :1, :], k[..., :1, :], k[..., 1:, :], k[..., 1:, :], keys=k[..., :0, :], values=k[..., :0, :]
    )
    keys, values = ctx.handles()
    assert keys.device.type == "meta" and keys.shape == (1, 2, 5, 4)
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.nn.functional.scaled_dot_product_attention(q, keys, values).sum().item()
    stripped = torch.empty_like(keys)  # a model that rebuilt the keys would lose the context
    with pytest.raises(ValueError, match="decode_attention='rebuild'"):
        attn_mod.factored_attention(torch.nn.Module(), q, stripped, stripped, None)


def test_attend_equals_softmax_attention_by_hand() -> None:
    # A context of sinks, one run of two rank-2 chunks, and a tail, against attention over the rebuilt states.
    torch.manual_seed(0)
    b, h, rep, d, t, w = 2, 2, 3, 8, 5, 2
    u_k, v_k = torch.randn(b, h, 2, w, t), torch.randn(b, h, 2, w, d)
    u_v, v_v = torch.randn(b, h, 2, w, t), torch.randn(b, h, 2, w, d)
    sink_k, sink_v, tail_k, tail_v = (torch.randn(b, h, n, d) for n in (2, 2, 3, 3))
    ctx = FactoredContext(sink_k, sink_v, tail_k, tail_v, key_runs=[(u_k, v_k)], value_runs=[(u_v, v_v)])
    comp_k = (u_k.transpose(-1, -2) @ v_k).reshape(b, h, 2 * t, d)
    comp_v = (u_v.transpose(-1, -2) @ v_v).reshape(b, h, 2 * t, d)
    keys = torch.cat([sink_k, comp_k, tail_k], -2).repeat_interleave(rep, dim=1)
    values = torch.cat([sink_v, comp_v, tail_v], -2).repeat_interleave(rep, dim=1)
    q = torch.randn(b, h * rep, 2, d)
    mask = torch.ones(b, 1, 2, keys.shape[-2], dtype=torch.bool).tril(keys.shape[-2] - 2)
    mask[1, ..., :3] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3)
    got = attend(q, ctx, mask, 0.3)
    torch.testing.assert_close(got, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # No mask: causal over the last two positions, as the mask above is without the padding.
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask[0:1].expand(b, -1, -1, -1), scale=0.3
    )
    torch.testing.assert_close(attend(q, ctx, None, 0.3), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_decode_attention_is_validated() -> None:
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        CompressionConfig(decode_attention="fast")


def fused(test):
    """Run ``test`` with the fused C++ kernel; skipped where it cannot be built (a CI machine fails on that)."""
    skip = pytest.mark.skipif(not kernels.available(), reason="the fused kernel could not be built here")
    return pytest.mark.needs_cpu_kernel(skip(test))


def _prefilled_layer(config: CompressionConfig, tokens: int = 70):
    """Layer 1 of a tiny Llama's cache after a prefill of ``tokens`` in a batch of 2 and ``compress_all``: chunks
    of 8 and a final partial one (of 4 for 70 tokens, shorter than a quantisation group; of 5 for 71, odd)."""
    model = make_tiny_model("llama")
    cache = ChunkedSVDCache.from_model(model, config)
    with torch.no_grad():
        model(
            input_ids=random_ids(tokens, batch=2, seed=5), **{cache_kwarg_name(model): cache}, use_cache=True
        )
    cache.compress_all()
    layer = cache.layers[1]
    assert {c.length for c in layer.chunks} == {8, (tokens - 2) % 8}
    return layer


def _assert_sdpa_over_the_rebuilt_states(got: torch.Tensor, layer, query: torch.Tensor) -> None:
    """``got`` is attention over the layer's rebuilt states (query i at position length - q_len + i, causal)."""
    keys, values = layer.full_states()
    q_len = query.shape[2]
    length, rep = keys.shape[-2], query.shape[1] // keys.shape[1]
    allowed = torch.arange(length)[None, :] <= torch.arange(length - q_len, length)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1), attn_mask=allowed, scale=0.25
    )
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-4)


@fused
@pytest.mark.parametrize("bits, basis_bits", [(4, 4), (8, 4), (2, 4), (4, 8)])
@pytest.mark.parametrize("q_len", [1, 3])
def test_fused_kernel_equals_the_pytorch_path(bits, basis_bits, q_len, monkeypatch) -> None:
    """The kernel reads the packed codes; the PyTorch path dequantises them into padded runs first. Same
    factors, so the attention outputs agree to float rounding: at 2, 4 and 8 bits, with a batch of 2 (rows of
    several sequences in one factor) and chunks of several lengths (a final partial chunk of 4 < group 8)."""
    config = CompressionConfig(
        **BASE, compress_keys_pre_rope=False, decode_attention="factored", quantization_bits=bits,
        basis_bits=basis_bits,
    )  # fmt: skip
    layer = _prefilled_layer(config)
    query = torch.randn(2, 4, q_len, 16, generator=torch.Generator().manual_seed(6))
    ctx = layer.factored_context()
    assert ctx.key_packed is not None and ctx.value_packed is not None and ctx.key_runs is None
    got = attend(query, ctx, None, 0.25)
    monkeypatch.setattr(kernels, "available", lambda: False)
    plain = layer.factored_context()
    assert plain.key_packed is None and plain.key_runs is not None
    torch.testing.assert_close(got, attend(query, plain, None, 0.25), atol=1e-5, rtol=1e-5)
    # And both equal attention over the rebuilt states.
    _assert_sdpa_over_the_rebuilt_states(got, layer, query)


@fused
@pytest.mark.parametrize("rotary_dim", [16, 8], ids=["full_rotary", "partial_rotary"])
def test_rope_scores_kernel_equals_rotating_then_scoring(rotary_dim) -> None:
    """The kernel rotates pre-rotary keys while it scores them: the scores of rotating the keys first, with
    the channels past the rotary ones left as they are."""
    g = torch.Generator().manual_seed(8)
    query, keys = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 3, 37, 16, generator=g)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    cos, sin = range_cos_sin(50, 37, inv_freq, torch.device("cpu"))
    want = query @ rotate_range(keys, 50, inv_freq).transpose(-1, -2)
    torch.testing.assert_close(kernels.rope_scores(query, keys, cos, sin), want, atol=1e-5, rtol=1e-5)


@fused
@pytest.mark.parametrize("sharing", ["none", "keys"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_pre_rotary_keys_scored_by_the_kernel_equal_the_pytorch_path(sharing, q_len, monkeypatch) -> None:
    """Pre-rotary keys are rebuilt as factored and rotated inside the kernel's scoring (``keys_rope``), not
    rotated into a second buffer first: same attention as the PyTorch path and as SDPA over the rebuilt states,
    with a basis per chunk and a shared one, a batch of 2 and a final partial chunk."""
    layer = _prefilled_layer(CompressionConfig(**BASE, decode_attention="factored", basis_sharing=sharing))
    assert all(c.keys_pre_rope for c in layer.chunks)
    query = torch.randn(2, 4, q_len, 16, generator=torch.Generator().manual_seed(6))
    ctx = layer.factored_context()
    assert ctx.keys_rope is not None
    # On a shared basis the kernel rebuilds the keys from their codes; per-chunk bases are rebuilt first.
    assert (ctx.key_basis is not None) == (sharing == "keys") and (ctx.keys is None) == (sharing == "keys")
    got = attend(query, ctx, None, 0.25)
    monkeypatch.setattr(kernels, "available", lambda: False)
    plain = layer.factored_context()
    assert plain.keys_rope is None
    torch.testing.assert_close(got, attend(query, plain, None, 0.25), atol=1e-5, rtol=1e-5)
    _assert_sdpa_over_the_rebuilt_states(got, layer, query)


@fused
@pytest.mark.parametrize("bits, basis_bits", [(4, 4), (2, 8), (8, 4)])
@pytest.mark.parametrize("factor_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("group, tokens", [(8, 71), (12, 70)], ids=["odd_chunk", "group_of_12"])
def test_basis_kernel_scores_pre_rotary_keys_from_their_codes(
    bits, basis_bits, factor_dtype, group, tokens
) -> None:
    """`basis_rope_scores` rebuilds pre-rotary keys on a shared basis from their codes inside the kernel: its
    scores are those of rebuilding the keys in PyTorch (dequantised coefficients times the basis), rotating them
    to their positions and scoring them, at 2, 4 and 8 bits, with float32 and bfloat16 scales, an odd final
    chunk and groups of 12 (a chunk of 8 is a partial group), a batch of 2, and 8 or 10 query rows.
    The later chunks keep correction rows of their own (``basis_corrections``), decoded inside the kernel."""
    config = CompressionConfig(
        **{**BASE, "quant_group_size": group}, decode_attention="factored", basis_sharing="keys",
        quantization_bits=bits, basis_bits=basis_bits, factor_dtype=factor_dtype,
    )  # fmt: skip
    layer = _prefilled_layer(config, tokens)
    ctx = layer.factored_context()
    packed = ctx.key_basis
    assert packed is not None and packed.token.scale.dtype == getattr(torch, factor_dtype)
    if (bits, basis_bits, factor_dtype) == (8, 4, "float32"):
        assert packed.extra is not None  # the later chunks' own rows are read too
    keys = rotate_range(packed.reconstruct(), layer.store.chunks[0].start, layer.store.inv_freq)
    for rows in (8, 10):  # 8: rotated and scored in registers; 10: more rows than it keeps there
        qg = torch.randn(2, 2, rows, 16, generator=torch.Generator().manual_seed(12))
        got = kernels.basis_rope_scores(qg, packed, *ctx.keys_rope, layer.store.sink_keys, layer.keys)
        want = qg @ torch.cat([layer.store.sink_keys, keys, layer.keys], dim=-2).transpose(-1, -2)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # Not the zero-free scores of some other keys: the rebuilt keys are far from zero.
    assert want.abs().mean() > 0.1


@fused
@pytest.mark.parametrize("factor_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("group, tokens", [(8, 71), (12, 70)], ids=["odd_chunk", "group_of_12"])
@pytest.mark.parametrize("q_len", [1, 2])
def test_fused_kernel_reads_every_scale_dtype_and_layout(
    factor_dtype, group, tokens, q_len, monkeypatch
) -> None:
    """The kernel reads the scales as stored (float32 and bfloat16 here, float16 above) and lays each group's
    codes out in 32-lane blocks: an odd final chunk (its 4-bit codes in order, not split into even and odd
    tokens), groups of 12 (a chunk of 8 is one partial group), 4 and 8 query rows (register tiles of 3 rows and a
    last one of 1 or 2): the attention of the PyTorch path and of SDPA over the rebuilt states."""
    config = CompressionConfig(
        **{**BASE, "quant_group_size": group}, compress_keys_pre_rope=False, decode_attention="factored",
        factor_dtype=factor_dtype,
    )  # fmt: skip
    layer = _prefilled_layer(config, tokens)
    ctx = layer.factored_context()
    assert ctx.key_packed.token.scale.dtype == getattr(torch, factor_dtype)
    query = torch.randn(2, 4, q_len, 16, generator=torch.Generator().manual_seed(9))
    got = attend(query, ctx, None, 0.25)
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch.testing.assert_close(got, attend(query, layer.factored_context(), None, 0.25), atol=1e-5, rtol=1e-5)
    _assert_sdpa_over_the_rebuilt_states(got, layer, query)


@fused
@pytest.mark.parametrize("pre_rope, sharing", [(False, "none"), (True, "none"), (True, "keys")])
def test_fused_kernel_gives_the_same_results_on_several_threads(pre_rope, sharing, monkeypatch) -> None:
    """The kernels split their work over torch's threads (factor and batch row for the scores and value sums,
    keys for the rotated scores, rows for the rebuild's dequantisation): scores and rebuilt rows bit for bit those
    of one thread, value sums (each thread sums its own factors, then the threads' sums are added) to float
    rounding, and the attention through them the same."""
    config = CompressionConfig(
        **BASE, compress_keys_pre_rope=pre_rope, decode_attention="factored", basis_sharing=sharing
    )
    layer = _prefilled_layer(config, 261)  # 33 chunks a head: 66 factors, each over 2 batch rows
    ctx = layer.factored_context()
    query = torch.randn(2, 4, 3, 16, generator=torch.Generator().manual_seed(10))
    qg = query.reshape(2, 2, 6, 16)
    probs = torch.softmax(
        torch.randn(2, 2, 6, ctx.value_packed.length, generator=torch.Generator().manual_seed(11)), -1
    )
    rebuilds = []
    real = kernels.dequant_into
    monkeypatch.setattr(kernels, "dequant_into", lambda *a: rebuilds.append(1) or real(*a))

    def run() -> tuple[torch.Tensor, ...]:
        if ctx.key_basis is not None:
            keys = kernels.basis_rope_scores(qg, ctx.key_basis, *ctx.keys_rope)
        elif pre_rope:
            keys = kernels.rope_scores(qg, ctx.keys, *ctx.keys_rope)
        else:
            keys = kernels.scores(qg, ctx.key_packed)
        rebuilt = torch.cat(layer.full_states(), dim=-1)  # the packed rebuild, through dequant_into
        return keys, kernels.values(probs, ctx.value_packed), rebuilt, attend(query, ctx, None, 0.25)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        for threads in (2, 3) * 8:  # repeated: a data race shows only now and then
            torch.set_num_threads(threads)
            many = run()
            assert torch.equal(many[0], one[0]) and torch.equal(many[2], one[2])
            torch.testing.assert_close(many[1], one[1], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(many[3], one[3], atol=1e-6, rtol=1e-6)
    finally:
        torch.set_num_threads(before)
    assert rebuilds


@pytest.mark.skipif(
    shutil.which("c++") is None or shutil.which("ninja", path=os.path.dirname(sys.executable) + os.pathsep
                                                + os.environ.get("PATH", "")) is None,
    reason="no C++ compiler or ninja: the kernel is not expected to build",
)  # fmt: skip
def test_the_kernel_builds_where_a_compiler_is() -> None:
    """The fused-kernel tests skip where the kernel cannot be built; on a machine with a compiler and ninja (this
    one, CI) a build error must fail the suite, not skip those tests."""
    assert kernels.available()


def test_kernels_can_be_switched_off_and_a_failed_build_falls_back(monkeypatch, caplog) -> None:
    monkeypatch.setenv("CHUNKED_DECOMP_KERNELS", "0")
    assert not kernels.available()
    monkeypatch.delenv("CHUNKED_DECOMP_KERNELS")
    # A machine without a compiler: the build raises, the attention keeps its PyTorch path, with a warning.
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_MODULE", None)
    monkeypatch.setattr(
        cpp, "load_inline", lambda **kw: (_ for _ in ()).throw(RuntimeError("no c++ compiler"))
    )
    with caplog.at_level("WARNING", logger="chunked_decomp"):
        assert not kernels.available()
    assert "no c++ compiler" in caplog.text and "PyTorch path" in caplog.text
    model = make_tiny_model("llama")
    config = CompressionConfig(**BASE, compress_keys_pre_rope=False, decode_attention="factored")
    cache = ChunkedSVDCache.from_model(model, config)
    with torch.no_grad():
        model(input_ids=random_ids(40, seed=7), **{cache_kwarg_name(model): cache}, use_cache=True)
    ctx = cache.layers[0].factored_context()
    assert ctx.key_packed is None and ctx.value_packed is None and ctx.value_runs is not None


def test_a_compiler_without_openmp_builds_the_serial_kernel(monkeypatch, caplog) -> None:
    """Apple's clang has no -fopenmp: the build without it is tried next (and its module is used), with a
    warning; the flags of both tries are the same but for OpenMP."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_MODULE", None)
    tries = []

    def load_inline(**kw):
        tries.append(kw)
        if "-fopenmp" in kw["extra_cflags"]:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return "the serial module"

    monkeypatch.setattr(cpp, "load_inline", load_inline)
    with caplog.at_level("WARNING", logger="chunked_decomp"):
        assert kernels._load() == "the serial module"
    assert [t["name"] for t in tries] == [name for name, _ in kernels._BUILDS]
    assert tries[1]["name"] == "chunked_decomp_factored_attention_serial"
    assert (
        tries[0]["extra_cflags"] == [*tries[1]["extra_cflags"], "-fopenmp"]
        and tries[1]["extra_ldflags"] == []
    )
    assert "unsupported option '-fopenmp'" in caplog.text and "building it without" in caplog.text


@pytest.mark.slow
def test_the_kernel_built_without_openmp_gives_the_same_results(monkeypatch) -> None:
    """The serial build (a compiler without OpenMP) really compiles, and its attention equals the threaded
    build's bit for bit at the same thread count (which sets the split of the value sums, run or not on threads)."""
    if not kernels.available():
        pytest.skip("no C++ compiler here")
    serial = kernels._build(*kernels._BUILDS[1])
    config = CompressionConfig(**BASE, compress_keys_pre_rope=False, decode_attention="factored")
    ctx = _prefilled_layer(config, 261).factored_context()
    query = torch.randn(2, 4, 3, 16, generator=torch.Generator().manual_seed(12))
    before = torch.get_num_threads()
    try:
        threaded = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            threaded.append(attend(query, ctx, None, 0.25))
        monkeypatch.setattr(kernels, "_MODULE", serial)
        for threads, expected in zip((1, 2), threaded):
            torch.set_num_threads(threads)
            assert torch.equal(attend(query, ctx, None, 0.25), expected)
    finally:
        torch.set_num_threads(before)


def test_the_rebuild_never_builds_the_kernel(monkeypatch) -> None:
    """Only the factored attention compiles the extension; decoding that rebuilds never waits for a build nor
    writes one to the user's cache."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_MODULE", None)
    builds = []
    monkeypatch.setattr(cpp, "load_inline", lambda **kw: builds.append(kw))
    model = make_tiny_model("llama")
    ids = random_ids(60, seed=8)
    stepwise_logits(model, CompressionConfig(**BASE, decode_attention="rebuild"), ids, [40] + [1] * 20)
    assert builds == []


@pytest.mark.slow
def test_real_model_generates_the_same_tokens_factored_and_rebuilt(monkeypatch) -> None:
    """SmolLM2-135M with ``balanced`` (pre-rotary keys on a shared basis, scored by the fused kernel when it is
    built): greedy generation after a 1,100-token Wikipedia prompt gives the tokens of the rebuild path, logits to
    float rounding."""
    from chunked_decomp import ChunkedDecomp
    from chunked_decomp.evaluation.data import load_texts, load_token_ids
    from chunked_decomp.hf.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    ids = load_token_ids(tok, load_texts("wikipedia"), min_tokens=2200)[1000:2100][None]
    calls = []
    if kernels.available():
        real = kernels.basis_rope_scores
        monkeypatch.setattr(kernels, "basis_rope_scores", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for mode in ("rebuild", "factored"):
        config = CompressionConfig.from_preset("balanced", decode_attention=mode)
        with ChunkedDecomp(config=config).applied(model), torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)  # fmt: skip
        runs[mode] = (out.sequences[0, ids.shape[1] :], torch.stack(out.scores))
    assert torch.equal(runs["factored"][0], runs["rebuild"][0])
    torch.testing.assert_close(runs["factored"][1], runs["rebuild"][1], atol=2e-4, rtol=1e-4)
    # Every layer of every decoding step (the first token comes from the prefill), when the kernel is built.
    assert len(calls) == 23 * 30 or not kernels.available()
