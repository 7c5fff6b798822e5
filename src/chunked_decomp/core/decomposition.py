"""Batched low-rank factorisation of chunks and rank choice under a byte budget (no transformers import).

Every factoriser returns the same *projection* form for a batch of matrices ``x: (N, m, n)``:

    x ≈ token_factor[:, :, :r] @ channel_factor[:, :r, :]

with ``token_factor: (N, m, k)`` and ``channel_factor: (N, k, n)``, ``k = min(m, n)`` (or the sketch size for
the randomized finder), ordered by decreasing singular value, and ``spectrum: (N, k)`` the singular values.
One of the two factors is orthonormal (the one on the larger side), so the full-rank product is an orthogonal
projection of ``x`` onto its own row or column space and reconstructs it exactly up to float32 rounding.

Factorisers (Halko, Martinsson & Tropp 2011 for the randomized range finder):
- ``exact``: ``torch.linalg.svd``. Reference; slow when batched, on CPU and GPU alike.
- ``gram``: eigen-decomposition of the small Gram matrix (``n × n`` or ``m × m``) — one batched matrix product
  and a small symmetric eigensolver; gives the whole spectrum, which adaptive ranks need.
- ``randomized``: randomized range finder with power iterations, orthonormalised by shifted Cholesky-QR2,
  i.e. matrix products and ``(r+p) × (r+p)`` Cholesky factorisations only; gives the top ``r + p`` triplets.
- ``subspace``: orthogonal (subspace) iteration on the Gram matrix, orthonormalised by Cholesky-QR: matrix
  products and small Cholesky factorisations only, no eigensolver, so it suits GPUs, where batched ``eigh`` and
  ``svd`` cost orders of magnitude more than the bytes they read. Components come out nested
  (the first j span the dominant j-dimensional subspace, to the accuracy of the iteration) with their exact
  captured energies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Factorization:
    """Projection-form factors of a batch of matrices (see module docstring).

    token_factor: (N, m, k) float32; channel_factor: (N, k, n) float32; spectrum: (N, k) float32, descending.
    """

    token_factor: torch.Tensor
    channel_factor: torch.Tensor
    spectrum: torch.Tensor

    def reconstruct(self, rank: int | None = None) -> torch.Tensor:
        """x̂ with the first ``rank`` components (all when ``None``): (N, m, n)."""
        k = self.spectrum.shape[-1] if rank is None else rank
        return self.token_factor[..., :k] @ self.channel_factor[..., :k, :]


def factorize_exact(x: torch.Tensor, rank: int | None = None) -> Factorization:
    """Truncated SVD through ``torch.linalg.svd``. x: (N, m, n) → `Factorization` (k = min(m, n))."""
    x = x.to(torch.float32)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    m, n = x.shape[-2:]
    if n <= m:
        return Factorization(u * s.unsqueeze(-2), vh, s)
    return Factorization(u, s.unsqueeze(-1) * vh, s)


@dataclass
class GramBasis:
    """The right singular basis of x: (N, m, n), ``n <= m``, from the eigen-decomposition of ``xᵀx``, before any
    factor is formed, so that factors of the first k components cost only those k.

    x: (N, m, n) float32; evecs: (N, n, n), eigenvectors in ascending eigenvalue order (as LAPACK returns them);
    spectrum: (N, n) singular values, descending.
    """

    x: torch.Tensor
    evecs: torch.Tensor
    spectrum: torch.Tensor

    def _top(self, k: int) -> torch.Tensor:
        """(N, n, k): the eigenvectors of the k largest eigenvalues, largest first."""
        return self.evecs[..., self.evecs.shape[-1] - k :].flip(-1)

    def tokens(self, k: int) -> torch.Tensor:
        """Token factor of the first k components, ``x V_k``: (N, m, k)."""
        return self.x @ self._top(k)

    def channels(self, k: int) -> torch.Tensor:
        """Channel factor of the first k components, ``V_kᵀ``: (N, k, n)."""
        return self._top(k).transpose(-1, -2)

    def rows(self, first: int, last: int) -> GramBasis:
        """Matrices ``first … last - 1`` of the batch (views)."""
        return GramBasis(self.x[first:last], self.evecs[first:last], self.spectrum[first:last])


def gram_basis(x: torch.Tensor) -> GramBasis:
    """:class:`GramBasis` of x: (N, m, n) with ``n <= m`` (one batched Gram product and eigen-decomposition)."""
    x = x.to(torch.float32)
    evals, evecs = torch.linalg.eigh(x.transpose(-1, -2) @ x)
    return GramBasis(x, evecs, evals.flip(-1).clamp_min(0).sqrt())


def factorize_gram(x: torch.Tensor, rank: int | None = None) -> Factorization:
    """SVD through the eigen-decomposition of the smaller Gram matrix. x: (N, m, n) → `Factorization`.

    With ``n <= m`` the basis ``V`` of ``xᵀx`` is orthonormal and ``x ≈ (x V_r) V_rᵀ``; otherwise ``U`` of ``x xᵀ``
    and ``x ≈ U_r (U_rᵀ x)``. Neither divides by a singular value, so rank-deficient and all-zero matrices are safe.
    """
    x = x.to(torch.float32)
    m, n = x.shape[-2:]
    if n <= m:
        basis = gram_basis(x)
        return Factorization(basis.tokens(n), basis.channels(n), basis.spectrum)
    gram = x @ x.transpose(-1, -2)
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    spectrum = evals.clamp_min(0).sqrt()
    return Factorization(evecs, evecs.transpose(-1, -2) @ x, spectrum)


def _cholesky_qr(y: torch.Tensor, passes: int = 2, shift: float = 1e-6) -> torch.Tensor:
    """Orthonormalise the columns of y: (N, m, q) by shifted Cholesky-QR, ``passes`` times (matrix products and
    q × q Cholesky factorisations only). The factor is triangular, so the first j columns of the result span
    the first j of y whatever the shift. Each pass adds ``shift`` × the mean diagonal of ``yᵀy``."""
    for _ in range(passes):
        gram = y.transpose(-1, -2) @ y
        q = gram.shape[-1]
        # A shift proportional to the Gram's scale keeps Cholesky defined on rank-deficient chunks
        # (Fukaya et al. 2020, shifted CholeskyQR); the second pass restores orthogonality.
        shift_ = shift * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30) / q
        gram = gram + shift_[..., None, None] * torch.eye(q, dtype=y.dtype, device=y.device)
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            gram = gram + 1e-3 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(
                q, dtype=y.dtype, device=y.device
            )
            chol = torch.linalg.cholesky(gram)
        y = torch.linalg.solve_triangular(chol.transpose(-1, -2), y, upper=True, left=False)
    return y


def factorize_randomized(
    x: torch.Tensor, rank: int | None = None, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> Factorization:
    """Randomized range finder. x: (N, m, n) → `Factorization` with ``k = min(rank + oversample, m, n)``.

    When the sketch covers the whole space (``rank + oversample >= min(m, n)``) it falls back to
    :func:`factorize_gram`, which is then as cheap and exact.
    """
    x = x.to(torch.float32)
    m, n = x.shape[-2:]
    k_full = min(m, n)
    q = k_full if rank is None else min(rank + oversample, k_full)
    if q >= k_full:
        return factorize_gram(x)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(x.device)
    y = _cholesky_qr(x @ omega)
    xt = x.transpose(-1, -2)
    for _ in range(power_iters):
        y = _cholesky_qr(x @ _cholesky_qr(xt @ y))
    b = y.transpose(-1, -2) @ x  # (N, q, n)
    small = factorize_gram(b.transpose(-1, -2))  # bᵀ: (N, n, q) with q <= n
    # bᵀ ≈ (bᵀ W) Wᵀ, so b ≈ W (Wᵀ b) and x ≈ y W (Wᵀ b), with y W orthonormal.
    w = small.channel_factor.transpose(-1, -2)  # (N, q, q)
    return Factorization(y @ w, w.transpose(-1, -2) @ b, small.spectrum)


@contextmanager
def _tf32_on(device: torch.device) -> Iterator[None]:
    """float32 matrix products in TF32 on CUDA (10-bit mantissa, several times the float32 rate on tensor cores;
    far finer than the 2-8-bit quantisation of the factors); a no-op on other devices."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def factorize_subspace(
    x: torch.Tensor, rank: int | None = None, iters: int = 3, oversample: int = 8, seed: int = 0
) -> Factorization:
    """Orthogonal iteration on the Gram matrix. x: (N, m, n) → `Factorization`, ``k = min(rank + oversample,
    min(m, n))`` (all of ``min(m, n)`` when ``rank`` is None).

    With ``n <= m``: ``G = xᵀx`` (scaled to unit mean eigenvalue, plus a shift of 1e-3 that caps its condition
    number without moving its eigenvectors), ``B ← cholqr(G B)`` ``iters`` times from a Gaussian start, then
    ``x ≈ (x B) Bᵀ`` with B: (N, n, k) orthonormal. Cholesky-QR's triangular factor keeps the columns nested, so
    column j converges to the j-th eigenvector at the rate ``((λ_{j+1} + μ) / (λ_j + μ))^iters``; the columns are
    then sorted by their captured norm ``‖x b_j‖``, which is ``spectrum``: exact for the projection whatever the
    convergence, and what the rank allocation spends bytes on. At ``k = n`` the reconstruction is exact up
    to the orthonormality of B (about 1e-6). Each step orthonormalises by a shifted pass then a plain one
    (shifted Cholesky-QR, Fukaya et al. 2020: the shift bounds the condition number of the first pass's output,
    so the second is accurate), which keeps B orthonormal although powers of G are ill-conditioned in float32.
    Cost: one Gram product, ``2 * iters + 1`` Cholesky-QR passes of (n × k) matrices, and the token product; in
    TF32 on CUDA.
    """
    x = x.to(torch.float32)
    m, n = x.shape[-2:]
    if n > m:
        f = factorize_subspace(x.transpose(-1, -2), rank, iters, oversample, seed)
        return Factorization(f.channel_factor.transpose(-1, -2), f.token_factor.transpose(-1, -2), f.spectrum)
    q = n if rank is None else min(rank + oversample, n)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    with _tf32_on(x.device):
        gram = x.transpose(-1, -2) @ x  # (N, n, n)
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]  # mean eigenvalue
        # All-zero chunks iterate on the identity (any orthonormal basis is exact for them).
        g = torch.where(scale > 0, gram / scale.clamp_min(1e-30), eye) + 1e-3 * eye
        gen = torch.Generator(device="cpu").manual_seed(seed)
        basis = torch.randn(n, q, generator=gen, dtype=torch.float32).to(x.device).expand(x.shape[0], n, q)
        for _ in range(iters):
            basis = _cholesky_qr(_cholesky_qr(g @ basis, passes=1, shift=1e-3), passes=1)
        basis = _cholesky_qr(basis, passes=1)  # (N, n, q), orthonormal columns
        # Columns sorted by captured energy ‖x b_j‖² = b_jᵀ G b_j: any order of an orthonormal basis is one, and this
        # one makes every prefix the best that r of its columns can do.
        captured, order = ((gram @ basis) * basis).sum(-2).clamp_min(0).sort(-1, descending=True)  # (N, q)
        basis = basis.gather(-1, order[:, None, :].expand_as(basis))
        tokens = x @ basis  # (N, m, q)
    return Factorization(tokens, basis.transpose(-1, -2), captured.sqrt())


FACTORIZERS: dict[str, Callable[..., Factorization]] = {
    "exact": factorize_exact,
    "gram": factorize_gram,
    "randomized": factorize_randomized,
    "subspace": factorize_subspace,
}


def factorize(
    x: torch.Tensor, method: str = "gram", rank: int | None = None, check_finite: bool = True
) -> Factorization:
    """Factor a batch x: (N, m, n) with the named factoriser (``exact``, ``gram`` or ``randomized``).

    ``check_finite=False`` skips the NaN/inf scan for callers that already made it.
    """
    try:
        fn = FACTORIZERS[method]
    except KeyError:
        raise ValueError(f"factorizer must be one of {sorted(FACTORIZERS)}, got {method!r}") from None
    if x.dim() != 3:
        raise ValueError(f"factorize expects a batch of matrices (N, m, n), got shape {tuple(x.shape)}")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("cannot factor keys or values containing NaN or inf")
    with single_thread_lapack():
        return fn(x, rank)


@contextmanager
def single_thread_lapack() -> Iterator[None]:
    """Run small batched work (eigh, svd, cholesky, and the cache's compression) on one thread.

    The batch is many tiny matrices, which threading does not speed up; and threaded LAPACK collapses when the
    cores are shared (a batched 64×64 ``eigh`` can take a hundred times longer on two busy threads than on one).
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """‖x − x̂‖_F / ‖x‖_F (0 for an all-zero x reconstructed exactly)."""
    num = (x.float() - x_hat.float()).norm()
    den = x.float().norm()
    if den == 0:
        return float(num)
    return float(num / den)
