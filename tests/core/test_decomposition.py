"""Factorisers and rotary embeddings: exactness at full rank, optimality at reduced rank (values)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunked_decomp.core.decomposition import (
    factorize,
    factorize_randomized,
    factorize_subspace,
    gram_basis,
    relative_error,
)
from chunked_decomp.core.rotary import rotate

METHODS = ("exact", "gram", "randomized", "subspace")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank(n: int, m: int, cols: int, rank: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(n, m, rank, generator=g) @ torch.randn(n, rank, cols, generator=g)
    return x + noise * torch.randn(n, m, cols, generator=g)


def _matrices() -> dict[str, torch.Tensor]:
    g = _gen(0)
    outliers = torch.randn(3, 24, 16, generator=g)
    outliers[:, 5, 3] = 1e4
    outliers[:, 17, 9] = -2.5e4
    return {
        "tall": torch.randn(3, 40, 16, generator=g),  # m > n, like a chunk of 40 tokens, head_dim 16
        "wide": torch.randn(3, 8, 32, generator=g),  # m < n, a short chunk of a joined layer
        "square": torch.randn(2, 16, 16, generator=g),
        "rank_deficient": _low_rank(3, 40, 16, 3, seed=1),
        "rank_deficient_wide": _low_rank(3, 10, 48, 2, seed=2),
        "constant": torch.full((2, 20, 16), 0.75),
        "zeros": torch.zeros(2, 20, 16),
        "outliers_1e4": outliers,
        "one_token": torch.randn(2, 1, 16, generator=g),
    }


MATRICES = _matrices()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MATRICES))
def test_full_rank_reconstructs_exactly(method: str, name: str) -> None:
    x = MATRICES[name]
    fac = factorize(x, method)
    k = min(x.shape[-2:])
    assert fac.spectrum.shape[-1] == k
    x_hat = fac.reconstruct()
    scale = x.abs().amax().clamp_min(1.0)
    assert (x_hat - x).abs().max() <= 2e-5 * scale, float((x_hat - x).abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(2, 40, 16), (2, 8, 32)])
def test_larger_side_factor_is_orthonormal(method, shape) -> None:
    x = torch.randn(shape, generator=_gen(3))
    fac = factorize(x, method)
    m, n = shape[-2:]
    if n <= m:
        q = fac.channel_factor  # (N, k, n): rows orthonormal
        gram = q @ q.transpose(-1, -2)
    else:
        q = fac.token_factor  # (N, m, k): columns orthonormal
        gram = q.transpose(-1, -2) @ q
    assert torch.allclose(gram, torch.eye(gram.shape[-1]).expand_as(gram), atol=1e-5)


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("name", ["tall", "wide", "square", "rank_deficient", "outliers_1e4"])
def test_spectrum_matches_torch_svd(method, name) -> None:
    x = MATRICES[name]
    s_ref = torch.linalg.svdvals(x)
    s = factorize(x, method).spectrum
    # The Gram route squares the matrix: small singular values are only known to ~sqrt(eps) * s_max.
    assert torch.allclose(s, s_ref, atol=1e-3 * float(s_ref.max()), rtol=1e-4)
    assert (s[..., :-1] >= s[..., 1:] - 1e-6 * s_ref.max()).all()  # descending


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_randomized_top_spectrum_and_near_optimal_error(rank) -> None:
    # Decaying spectrum + noise, sketch (rank + 8) well below min(m, n) = 48 so the range finder really runs.
    x = _low_rank(4, 96, 48, 12, seed=5, noise=0.05)
    s_ref = torch.linalg.svdvals(x)
    fac = factorize_randomized(x, rank=rank)
    assert fac.spectrum.shape[-1] == rank + 8
    assert torch.allclose(fac.spectrum[..., :rank], s_ref[..., :rank], rtol=1e-3)
    for i in range(x.shape[0]):
        optimal = float(s_ref[i, rank:].square().sum().sqrt())  # Eckart–Young
        got = float((x[i] - fac.reconstruct(rank)[i]).norm())
        assert got <= 1.02 * optimal + 1e-6, (got, optimal)


@pytest.mark.parametrize("rank", [None, 6])
def test_subspace_components_are_nested_near_optimal_with_exact_energies(rank) -> None:
    # A decaying spectrum (singular values 1 … 1e-3) in random directions, as key and value chunks have.
    g = _gen(11)
    basis = torch.linalg.qr(torch.randn(6, 48, 48, generator=g))[0]
    x = torch.randn(6, 96, 48, generator=g) @ torch.diag(torch.logspace(0, -3, 48)) @ basis
    fac = factorize_subspace(x, rank=rank)
    k = fac.spectrum.shape[-1]
    assert k == (48 if rank is None else 14)
    b = fac.channel_factor  # (N, k, n): orthonormal rows
    assert torch.allclose(b @ b.transpose(-1, -2), torch.eye(k).expand(6, k, k), atol=1e-5)
    # spectrum: each component's captured norm ‖x b_j‖ (the rank allocation's energies), non-increasing.
    assert torch.allclose(
        fac.spectrum.square().sum(-1), (x @ b.transpose(-1, -2)).square().sum((-1, -2)), rtol=1e-4
    )
    assert (fac.spectrum[..., :-1] >= fac.spectrum[..., 1:]).all()
    s_ref = torch.linalg.svdvals(x)
    for r in (2, 4, 6):
        optimal = s_ref[:, r:].square().sum(-1).sqrt()
        got = (x - fac.reconstruct(r)).flatten(1).norm(dim=-1)
        assert (got <= 1.1 * optimal).all(), (r, (got / optimal).max())
        assert (got >= optimal * (1 - 1e-4)).all()  # Eckart–Young: nothing beats the SVD


def test_subspace_more_iterations_converge_to_the_svd() -> None:
    x = _low_rank(4, 96, 48, 12, seed=5, noise=0.05)
    s_ref = torch.linalg.svdvals(x)
    optimal = s_ref[:, 4:].square().sum(-1).sqrt()
    ratios = [float(((x - factorize_subspace(x, iters=i).reconstruct(4)).flatten(1).norm(dim=-1) / optimal).max())
              for i in (1, 3, 16)]  # fmt: skip
    assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1.002, ratios


def test_randomized_recovers_a_low_rank_matrix_exactly() -> None:
    x = _low_rank(2, 64, 48, 3, seed=7)
    fac = factorize_randomized(x, rank=3)
    assert fac.spectrum.shape[-1] == 11  # a real sketch, not the Gram fall-back
    assert relative_error(x, fac.reconstruct(3)) < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_reduced_rank_error_equals_eckart_young(method) -> None:
    x = _low_rank(2, 40, 16, 16, seed=9)
    s = torch.linalg.svdvals(x)
    fac = factorize(x, method, rank=4)
    for r in (1, 4):
        optimal = s[:, r:].square().sum(-1).sqrt()
        got = (x - fac.reconstruct(r)).flatten(1).norm(dim=-1)
        slack = 1.05 if method in ("randomized", "subspace") else 1.0 + 1e-4
        assert (got <= slack * optimal + 1e-4).all()


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    true_rank=st.integers(1, 24),
    seed=st.integers(0, 10_000),
)
def test_property_error_never_rises_with_rank(method, m, n, true_rank, seed) -> None:
    x = _low_rank(2, m, n, true_rank, seed=seed, noise=0.01)
    fac = factorize(x, method)
    k = fac.spectrum.shape[-1]
    errors = [relative_error(x, fac.reconstruct(r)) for r in range(k + 1)]
    assert errors[0] == pytest.approx(1.0, abs=1e-6)
    assert all(b <= a + 1e-5 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_raises_value_error(method, bad) -> None:
    x = torch.randn(2, 8, 8)
    x[1, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        factorize(x, method)


def test_factorize_rejects_unknown_method_and_bad_shape() -> None:
    with pytest.raises(ValueError, match="factorizer must be one of"):
        factorize(torch.randn(1, 4, 4), "qr")
    with pytest.raises(ValueError, match=r"\(N, m, n\)"):
        factorize(torch.randn(4, 4), "gram")


def test_relative_error_values() -> None:
    x = torch.tensor([[3.0, 4.0]])
    assert relative_error(x, torch.zeros_like(x)) == pytest.approx(1.0)
    assert relative_error(x, x) == 0.0
    assert relative_error(x, torch.tensor([[3.0, 0.0]])) == pytest.approx(0.8)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


# ---- rotary -------------------------------------------------------------------------------------------------
def _inv_freq(head_dim: int = 16, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def test_rotate_then_inverse_is_identity() -> None:
    keys = torch.randn(2, 3, 50, 16, generator=_gen(11))
    pos = torch.arange(7, 57)
    inv = _inv_freq()
    assert torch.allclose(rotate(rotate(keys, pos, inv), pos, inv, inverse=True), keys, atol=1e-5)
    # A rotation: norms of each key are preserved, and position 0 is the identity.
    assert torch.allclose(rotate(keys, pos, inv).norm(dim=-1), keys.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(rotate(keys, torch.zeros(50), inv), keys)


def test_rotate_gives_the_floats_of_the_textbook_formula() -> None:
    """k·cos + rotate_half(k)·sin (Llama's form), forward and inverse, bit for bit, partial rotary included."""
    keys = torch.randn(2, 3, 40, 16, generator=_gen(13))
    pos = torch.arange(100, 140)
    for inv in (_inv_freq(), _inv_freq(8)):
        freqs = pos.float()[:, None] * inv[None, :]
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
        r, h = cos.shape[-1], cos.shape[-1] // 2
        k = keys[..., :r]
        half = torch.cat((-k[..., h:], k[..., :h]), dim=-1)
        for inverse, s in ((False, sin), (True, -sin)):
            expected = torch.cat(((k * cos).addcmul_(half, s), keys[..., r:]), dim=-1)
            assert torch.equal(rotate(keys, pos, inv, inverse=inverse), expected)


def test_partial_rotary_leaves_the_rest_untouched() -> None:
    keys = torch.randn(1, 1, 5, 16)
    out = rotate(keys, torch.arange(5), _inv_freq(8))  # 8 rotary channels of 16
    assert torch.equal(out[..., 8:], keys[..., 8:])
    assert not torch.allclose(out[..., :8], keys[..., :8])


def test_rotate_matches_transformers_llama() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)
    rope = LlamaRotaryEmbedding(config)
    keys = torch.randn(2, 2, 30, 16, generator=_gen(12))
    pos = torch.arange(3, 33)
    cos, sin = rope(keys, pos[None].expand(2, -1))
    _, expected = apply_rotary_pos_emb(keys, keys, cos, sin)
    assert torch.allclose(rotate(keys, pos, rope.inv_freq), expected, atol=1e-5)


def test_gram_basis_prefix_factors_are_the_optimal_rank_k_approximation() -> None:
    """`gram_basis` forms factors for the first k components only; each prefix is the truncated SVD (Eckart–Young:
    the squared error is the sum of the dropped squared singular values)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, 16, generator=gen) * torch.linspace(3.0, 0.05, 16)
    s = torch.linalg.svdvals(x.double())
    basis = gram_basis(x)
    assert torch.allclose(basis.spectrum.double(), s, rtol=1e-4, atol=1e-4)
    for k in (1, 5, 11, 16):
        approx = basis.tokens(k) @ basis.channels(k)
        err = (x.double() - approx.double()).pow(2).sum((-1, -2))
        assert torch.allclose(err, s[:, k:].pow(2).sum(-1), rtol=1e-3, atol=1e-3)
    # A batch slice is the basis of those matrices.
    assert torch.equal(basis.rows(2, 4).tokens(3), basis.tokens(3)[2:4])
