"""Which units a compression step allocates ranks to, against which budget.

- Per layer (``rank_allocation="per_layer"``): each chunk of a layer in turn, oldest first, against the layer's
  own budget, which the earlier chunks' ranks fix exactly (bytes are linear in the rank), so no factor is
  encoded before every rank is known. With a shared basis, one allocation for the whole step
  (`SharedBasis.units`).
- Pooled (``"pooled"``): every component of every chunk of every layer in the step ranked at once, by weighted
  energy per byte, against the layers' summed budget: a layer whose spectrum is flatter gets more rank.

The rank policy (`chunked_decomp.compression.ranks`) turns units and a budget into ranks.
"""

from __future__ import annotations

import math

import numpy as np

from chunked_decomp.compression.budget import spendable
from chunked_decomp.compression.ranks import Units, choose_ranks_linear, pad_rows


def allocate(job) -> None:
    """Ranks of one job's chunks against its layer's own budget (``job.ranks``, one list per chunk)."""
    store = job.store
    if store.basis is not None:
        units, owners = store.basis.units(job, store)
        # Before any basis this job stores is counted: the corrections spend what the ranks leave of it.
        job.budget = store.chunk_budget(sum(job.sizes))
        store.basis.apply_ranks(job, store.plan.policy.ranks(units, job.budget), owners)
        return
    pending_tokens = pending_bytes = 0
    shares = _shares(job)
    stored = store.aged_nbytes()
    for i, s in enumerate(job.sizes):
        fk, fv = job.factored[s]
        cols = [fk.columns] * fk.groups + [fv.columns] * fv.groups
        units = chunk_units(store, s, shares[s][job.slot[i]], fk.groups, fv.groups, cols)
        budget = store.chunk_budget(s, pending_tokens, pending_bytes, stored)
        r = store.plan.policy.ranks(units, budget)
        job.ranks.append(r)
        pending_tokens += s
        pending_bytes += sum(ri * c for ri, c in zip(r, units.per_rank))


def _shares(job) -> dict[int, np.ndarray]:
    """Energy shares of every unit of the job's chunks per length, (n_chunks, key groups + value groups, k), on
    the host once: the allocation is a few hundred scores per chunk, where each device op would cost more."""
    return {
        s: np.concatenate([fk.energy.cpu().numpy(), fv.energy.cpu().numpy()], axis=1)
        for s, (fk, fv) in job.factored.items()
    }


def chunk_units(
    store, length: int, shares: np.ndarray, key_groups: int, value_groups: int, cols: list[int]
) -> Units:
    """The units of one chunk of ``length`` tokens: shares (units, k), each group's columns ``cols``."""
    k = shares.shape[-1]
    kinds = ["k"] * key_groups + ["v"] * value_groups
    caps = [k] * len(kinds)
    floors = [min(c, math.ceil(store.plan.min_rank_ratio * k)) for c in caps]
    scores = shares * store.unit_weights(key_groups, value_groups)[:, None]
    per_rank = [store.rank_cost(length, c, kind=kd) for c, kd in zip(cols, kinds)]
    return Units(shares, scores, kinds, per_rank, caps, floors)


def allocate_pooled(jobs: list) -> None:
    """Ranks of every chunk of every job at once (``rank_allocation="pooled"``).

    A component's score is its share of its unit's squared norm, times the unit's weight and the chunk's length
    (a token counts the same in every chunk), divided by its bytes. The budget is the chunks' summed allowance
    plus the jobs' summed balance (`chunked_decomp.compression.budget`), so the bytes the layers store together
    converge to the budget as each layer's do when allocated alone.
    """
    rows, costs, floors, owners = [], [], [], []
    shared: dict[int, list] = {}
    allowance = balance = 0.0
    for n, job in enumerate(jobs):
        store = job.store
        ref_token = store.token_bytes(store.reference_element_size)
        allowance += store.plan.budget.allowance(ref_token, sum(job.sizes))
        aged = store.sink_length + store.compressed_length
        balance += store.plan.budget.allowance(ref_token, aged) - store.aged_nbytes()
        if store.basis is not None:
            # Units of a shared basis span the job's chunks (see SharedBasis.units).
            units, shared[n] = store.basis.units(job, store)
            rows += list(units.scores)
            costs += units.per_rank
            floors += units.floors
            owners.append((n, len(shared[n])))
            continue
        shares = _shares(job)
        for i, s in enumerate(job.sizes):
            fk, fv = job.factored[s]
            e = shares[s][job.slot[i]].astype(np.float64)
            k = e.shape[-1]
            weights = store.unit_weights(fk.groups, fv.groups)
            cols = [fk.columns] * fk.groups + [fv.columns] * fv.groups
            kinds = ["k"] * fk.groups + ["v"] * fv.groups
            rows += list(e * (weights * s)[:, None])
            costs += [store.rank_cost(s, c, kind=kd) for c, kd in zip(cols, kinds)]
            floors += [min(k, math.ceil(store.plan.min_rank_ratio * k))] * len(cols)
            owners.append((n, len(cols)))
    budget = spendable(allowance, balance)
    ranks = choose_ranks_linear(pad_rows(rows), costs, budget, floors)
    pool = [budget - float(np.dot(ranks, costs))]
    for job in jobs:
        job.correction_pool = pool
    at = 0
    for n, count in owners:
        if n in shared:
            jobs[n].store.basis.apply_ranks(jobs[n], ranks[at : at + count], shared[n])
        else:
            jobs[n].ranks.append(ranks[at : at + count])
        at += count
