"""A basis shared by every chunk of a layer (``basis_sharing``): one set of rows per kind and group, stored once.

The first span a layer compresses fixes the basis: the principal directions of its chunks, encoded, then cut to
the components that span keeps (each kept component costs its token rows in every chunk plus its basis row
once, and both are paid from that span's budget). Every chunk is then stored as coefficients on those rows; later
chunks keep at most the rows stored. With corrections, a chunk spends the bytes the shared rows leave on
components of its own residual, stored as extra rows of its channel factor (`SharedRows.extra`).

Quantisation leaves the stored rows ``B`` slightly skew. Chunks are projected on ``q``, the stored rows made
orthonormal (Gram-Schmidt, so row j of q spans rows 0..j of B), and their coefficients cut to a rank r are turned
into coefficients on B through ``mix`` (``q = mixᵀ B``): they then rebuild x projected on the first r stored rows,
where coefficients taken on skew rows would count the quantisation error twice.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from chunked_decomp.compression.factorizer import matrices
from chunked_decomp.compression.ranks import Units, choose_ranks_linear, pad_rows
from chunked_decomp.core.decomposition import factorize
from chunked_decomp.core.factors import (
    CompressedChunk,
    Factor,
    FactorCodec,
    SharedRows,
    cat_rows,
    factor_nbytes,
    take_rank,
)


class SharedBasis:
    """The shared rows of one layer, for the kinds in ``kinds`` ("k", "v").

    bases: per kind, one encoded basis per group, (rows, columns), cut to the rank the first span keeps;
    drafts: between factoring and allocating that first span, each group's full basis, encoded, not yet paid, and
    its (q, mix) (``frames``). Once the basis is cut, (q, mix) are derived from the stored rows at each step that
    needs them rather than held: float32 frames would cost more than the 4-bit rows they describe.
    """

    def __init__(self, kinds: frozenset[str], corrections: bool):
        self.kinds = kinds
        self.corrections = corrections
        self.bases: dict[str, list[Factor]] = {}
        self.drafts: dict[str, list[Factor]] = {}
        self.frames: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def shares(self, kind: str) -> bool:
        return kind in self.kinds

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (the drafts are transient and not yet part of the cache)."""
        return sum(factor_nbytes(b) for rows in self.bases.values() for b in rows)

    def reset(self) -> None:
        self.bases, self.drafts, self.frames = {}, {}, {}

    def frames_for(
        self, kind: str, xg: torch.Tensor, codec: FactorCodec
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, mix)`` of ``kind`` for projecting chunks xg: (n, batch, groups, T, columns), each (groups, columns,
        columns) float32, zero past the rows stored (see the module docstring). On first use the basis is computed
        from xg and held as a draft until the allocation cuts it."""
        if kind in self.bases:
            return self._stored_frames(kind, xg.shape[-1], xg.device)
        if kind not in self.frames:
            g, cols = xg.shape[2], xg.shape[-1]
            gram = torch.einsum("nbgtc,nbgtd->gcd", xg.double(), xg.double())
            _, evecs = torch.linalg.eigh(gram)
            rows = evecs.flip(-1).transpose(-1, -2).float().contiguous()
            # Encoded in one call; each group's draft is a view (cut, i.e. copied, by the allocation).
            encoded = codec.encode_basis(rows)
            self.drafts[kind] = [encoded[gi] for gi in range(g)]
            decoded = SharedRows(encoded, cols).decode(torch.float64)  # (g, cols, cols)
            # Bᵀ = QR with R's diagonal made positive (each decoded row keeps its stored row's sign):
            # q = Qᵀ = (R⁻¹)ᵀ B, R⁻¹ upper triangular. Gram-Schmidt keeps prefixes, so cutting the basis to k rows
            # cuts q to its first k rows and mix to its leading k × k block (apply_ranks).
            q_, r_ = torch.linalg.qr(decoded.transpose(-1, -2))
            sign = torch.where(torch.diagonal(r_, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(torch.float64)
            q_, r_ = q_ * sign[:, None, :], r_ * sign[:, :, None]
            eye = torch.eye(cols, dtype=torch.float64, device=xg.device).expand(g, cols, cols)
            mix = torch.linalg.solve_triangular(r_, eye, upper=True)
            self.frames[kind] = (q_.transpose(-1, -2).float(), mix.float())
        return self.frames[kind]

    def units(self, job, store) -> tuple[Units, list[tuple[int | None, int]]]:
        """The units a job allocates, and each one's owner (chunk index, None for every chunk of the job;
        position in a chunk's ranks): one unit per group of a shared kind for all the job's chunks, one per chunk
        and group of a kind without. A unit's score is its component shares (each chunk's weighted by its length)
        times its weight and its tokens, -inf past the rows it may keep."""
        fk, fv = next(iter(job.factored.values()))
        weights = store.unit_weights(fk.groups, fv.groups)
        width = max(fk.columns, fv.columns)
        total = sum(job.sizes)
        shares, scores, kinds, per_rank, caps, floors, owners = [], [], [], [], [], [], []

        def add(kind, share, cap, cost, owner, tokens):
            row = np.zeros(width)
            row[: share.shape[-1]] = share
            shares.append(row)
            scores.append(np.where(np.arange(width) < cap, row * weights[owner[1]] * tokens, -np.inf))
            kinds.append(kind)
            caps.append(cap)
            per_rank.append(cost)
            floors.append(min(cap, math.ceil(store.plan.min_rank_ratio * width)))
            owners.append(owner)

        for kind, lo in (("k", 0), ("v", fk.groups)):
            parts = [(s, f_k if kind == "k" else f_v) for s, (f_k, f_v) in job.factored.items()]
            f0 = parts[0][1]
            if self.shares(kind):
                share = (
                    sum(s * f.energy.double().sum(0) for s, f in parts).cpu().numpy() / total
                )  # (groups, k)
                rows = [f0.columns] * f0.groups
                if kind in self.bases:
                    rows = [0 if b is None else b.shape[-2] for b in self.bases[kind]]
                cost = sum(store.rank_cost(s, f0.columns, True, kind) for s in job.sizes)
                if kind in self.drafts:
                    cost += store.plan.codec.basis_row_cost(f0.columns)
                for g in range(f0.groups):
                    add(kind, share[g], rows[g], cost, (None, lo + g), total)
                continue
            for s, f in parts:
                energy = f.energy.double().cpu().numpy()  # (n, groups, k)
                for j, i in enumerate(job.by_length[s]):
                    for g in range(f.groups):
                        cost = store.rank_cost(s, f.columns, kind=kind)
                        add(kind, energy[j, g], energy.shape[-1], cost, (i, lo + g), s)
        return Units(np.stack(shares), np.stack(scores), kinds, per_rank, caps, floors), owners

    def apply_ranks(self, job, ranks: list[int], owners: list[tuple[int | None, int]]) -> None:
        """Give the job's chunks their ranks, cut a drafted basis to them (its bytes added to
        ``job.basis_bytes``), and turn the shared kinds' coefficients into coefficients on the stored rows."""
        fk, fv = next(iter(job.factored.values()))
        job.ranks = [[0] * (fk.groups + fv.groups) for _ in job.sizes]
        for r, (i, pos) in zip(ranks, owners):
            for chunk_ranks in job.ranks if i is None else [job.ranks[i]]:
                chunk_ranks[pos] = int(r)
        ranks = job.ranks[0]  # the shared kinds' ranks are every chunk's
        for kind, lo in (("k", 0), ("v", fk.groups)):
            if kind in self.drafts:
                self._cut(kind, ranks[lo : lo + len(self.drafts[kind])], job)
        for f_k, f_v in job.factored.values():
            for kind, f, lo in (("k", f_k, 0), ("v", f_v, fk.groups)):
                if f.mix is not None:
                    self._to_stored_rows(kind, f, ranks[lo : lo + f.groups])

    def _cut(self, kind: str, kept: list[int], job) -> None:
        """Store the draft of ``kind`` cut to ``kept`` rows per group (its frames are no longer needed: the job's
        coefficients were taken on them, and later steps derive the frames of the stored rows)."""
        drafts = self.drafts.pop(kind)
        self.frames.pop(kind)
        self.bases[kind] = [take_rank(d, r) for d, r in zip(drafts, kept)]
        job.basis_bytes += sum(factor_nbytes(b) for b in self.bases[kind])

    def _stored_frames(self, kind: str, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, mix) of the stored rows of ``kind``: per group, its r rows B decoded, Bᵀ = QR with R's diagonal
        positive, q = Qᵀ (r × cols) and mix = R⁻¹ (r × r), zero-padded to (cols, cols). Gram-Schmidt keeps
        prefixes, so these are the first span's frames cut to the rows kept."""
        groups = self.bases[kind]
        q = torch.zeros(len(groups), cols, cols, device=device)
        mix = torch.zeros(len(groups), cols, cols, device=device)
        for g, rows in enumerate(groups):
            r = 0 if rows is None else rows.shape[-2]
            if r == 0:
                continue
            decoded = SharedRows(rows, r).decode(torch.float64)  # (r, cols)
            q_, r_ = torch.linalg.qr(decoded.transpose(-1, -2))
            sign = torch.where(torch.diagonal(r_) < 0, -1.0, 1.0).to(torch.float64)
            q_, r_ = q_ * sign[None, :], r_ * sign[:, None]
            eye = torch.eye(r, dtype=torch.float64, device=device)
            q[g, :r] = q_.transpose(-1, -2).float()
            mix[g, :r, :r] = torch.linalg.solve_triangular(r_, eye, upper=True).float()
        return q, mix

    def _to_stored_rows(self, kind: str, f, ranks: list[int]) -> None:
        """Set the chunks' channel factors to the stored rows, and their coefficients on the orthonormal rows,
        cut to each group's rank, to coefficients on the stored rows: x ≈ Σ_{i<r} c_i q_i = Σ_i c_i Σ_{j<=i}
        mix[j, i] B_j. Rows past the rank are zeroed first, so the kept ones depend only on kept ones."""
        f.channel[:] = [SharedRows(b, 0 if b is None else b.shape[-2]) for b in self.bases[kind]]
        r = torch.tensor(ranks, device=f.token_t.device)
        keep = torch.arange(f.columns, device=r.device)[None, :] < r[:, None]  # (groups, k)
        cut = f.token_t * keep[None, :, None, :, None]
        f.token_t.copy_(torch.einsum("ngbit,gji->ngbjt", cut, f.mix))

    def stored_rows(self, kind: str, groups: int, cols: int, device: torch.device) -> torch.Tensor:
        """The stored basis of ``kind`` decoded, zero-padded: (groups, cols, cols) float32."""
        out = torch.zeros(groups, cols, cols, device=device)
        for gi, rows in enumerate(self.bases[kind]):
            if rows is not None:
                out[gi, : rows.shape[-2]] = SharedRows(rows, rows.shape[-2]).decode(torch.float32)
        return out

    # ---- corrections ---------------------------------------------------------------------------------------
    def add_corrections(self, job, built: dict[int, CompressedChunk], store) -> None:
        """Per-chunk corrections (``basis_corrections``): the bytes the job leaves of its budget buy components
        of each chunk's residual ``x - coefficients @ stored rows``, chosen across the job's chunks, kinds and
        groups by energy per byte (weighted as the ranks are), stored as extra rows of the chunk's channel factor.

        Chunks of the first span rarely have bytes left (the basis was cut to what they keep); later chunks,
        which keep at most the rows stored, have what those rows cannot hold.
        """
        slack = self._slack(job, built, store)
        fk, fv = next(iter(job.factored.values()))
        cheapest = min(
            store.rank_cost(s, f.columns, kind=k) for s in job.sizes for k, f in (("k", fk), ("v", fv))
        )
        if slack < cheapest:
            return
        units, rows, costs = self._residuals(job, store)
        extra = choose_ranks_linear(pad_rows(rows), costs, slack, [0] * len(rows))
        if job.correction_pool is not None:
            job.correction_pool[0] -= float(np.dot(extra, costs))
        at = 0
        for s, kind, token_t, channel in units:
            n, g = token_t.shape[:2]
            ranks = np.asarray(extra[at : at + n * g]).reshape(n, g)
            at += n * g
            self._attach(job, built, s, kind, token_t, channel, ranks, store.codec(kind))

    def _slack(self, job, built: dict[int, CompressedChunk], store) -> float:
        """The bytes the corrections may spend: the allocation's budget less what the job stored, its basis
        included (with pooled ranks, at most what the pool left)."""
        spent = sum(c.keys.nbytes + c.values.nbytes for c in built.values())
        if job.budget is not None:
            # Asking the budget again would see the new basis only as debt, and debt is capped: after many exact
            # sinks the cap is reached, and the corrections would spend the basis's bytes a second time.
            slack = job.budget - spent - job.basis_bytes
        else:  # pooled ranks: the pool left by the pooled allocation bounds it below
            slack = store.chunk_budget(sum(job.sizes)) - spent
        if job.correction_pool is not None:
            slack = min(slack, job.correction_pool[0])
        return slack

    def _residuals(self, job, store) -> tuple[list, list, list]:
        """Per length and shared kind, the residual of the job's chunks factored: (length, kind, token_t (n, g, b,
        k, T), channel (n, g, b, k, cols)); and per chunk and group, its weighted component shares and their
        per-component bytes."""
        fk, fv = next(iter(job.factored.values()))
        weights = store.unit_weights(fk.groups, fv.groups)
        units, rows, costs = [], [], []
        for s, (f_k, f_v) in job.factored.items():
            xk, xv = job.stack(s)
            for kind, x, f in (("k", xk, f_k), ("v", xv, f_v)):
                if not self.shares(kind):
                    continue
                n, b, g, cols = x.shape[0], x.shape[1], f.groups, f.columns
                mats = matrices(x, store.plan.joined).reshape(n, b, g, s, cols)
                # The coefficients are on the stored rows (see apply_ranks), zero past each rank.
                stored = self.stored_rows(kind, g, cols, x.device)
                resid = mats - torch.einsum("ngbkt,gkc->nbgtc", f.token_t, stored)
                fac = factorize(
                    resid.reshape(n * b * g, s, cols),
                    store.plan.factorizer_for(x.device.type),
                    check_finite=False,
                )
                k = fac.spectrum.shape[-1]
                total = mats.double().pow(2).sum((-1, -2)).clamp_min(1e-30)  # (n, b, g)
                share = (fac.spectrum.reshape(n, b, g, k).double() ** 2 / total[..., None]).mean(
                    1
                )  # (n, g, k)
                lo = 0 if kind == "k" else fk.groups
                w = weights[lo : lo + g]
                rows += list((share * torch.as_tensor(w * s)[None, :, None]).reshape(n * g, k).numpy())
                costs += [store.rank_cost(s, cols, kind=kind)] * (n * g)
                token_t = fac.token_factor.reshape(n, b, g, s, k).permute(0, 2, 1, 4, 3)
                channel = fac.channel_factor.reshape(n, b, g, k, cols).permute(0, 2, 1, 3, 4)
                units.append((s, kind, token_t, channel))
        return units, rows, costs

    def _attach(self, job, built, s, kind, token_t, channel, ranks: np.ndarray, codec: FactorCodec) -> None:
        """Encode the first ``ranks[j, g]`` residual components of chunk j, group g of length ``s`` and append them
        to its factors (token rows after the shared ones, channel rows as `SharedRows.extra`)."""
        top = int(ranks.max())
        if top == 0:
            return
        tok, chan = codec.encode(token_t[..., :top, :].contiguous(), channel[..., :top, :].contiguous())
        for j, i in enumerate(job.by_length[s]):
            fs = built[i].keys if kind == "k" else built[i].values
            for gi in range(token_t.shape[1]):
                t, c = fs.pairs[gi]
                r = int(ranks[j, gi])
                # Copies even without a correction: the job's token buffer is then held by no chunk.
                if r == 0:
                    fs.pairs[gi] = (None if t is None else take_rank(t, t.shape[-2]), c)
                    continue
                t_c, c_c = take_rank(tok[j, gi], r), take_rank(chan[j, gi], r)
                basis = self.bases[kind][gi]
                fs.pairs[gi] = (cat_rows(t, t_c), SharedRows(basis, 0 if c is None else c.rank, c_c))
