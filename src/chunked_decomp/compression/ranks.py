"""Rank policies: how many components each allocation unit keeps, given the units and a byte budget.

A *unit* is the factor pair of one group (a KV head, or all heads joined) of keys or values: of one chunk, or of
every chunk of a step when they share a layer's basis. Its components are ordered by decreasing energy, and
keeping a prefix of ``r`` of them costs ``r`` times its per-component bytes, so a policy only chooses prefix lengths:

- `FullRank`: every component (quantisation alone compresses);
- `FixedRank`: ``target_rank`` components (the budget is then a result);
- `SplitRank`: the budget split between keys and values by a fixed share, one rank per kind;
- `AdaptiveRank`: components ranked by weighted energy per byte across all units while they fit the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Units:
    """The units of one allocation, one row or entry each.

    shares: (units, k) each unit's component shares of its squared norm (zero-padded to the widest unit);
    scores: (units, k) what `AdaptiveRank` ranks (shares times the units' weights; -inf where a component may
    not be kept); kinds: "k" or "v"; per_rank: bytes of one component; caps: the most components a unit may keep;
    floors: the fewest it keeps.
    """

    shares: np.ndarray
    scores: np.ndarray
    kinds: list[str]
    per_rank: list[int]
    caps: list[int]
    floors: list[int]


class RankPolicy(Protocol):
    def ranks(self, units: Units, budget: float) -> list[int]:
        """One rank per unit, within ``budget`` bytes where the policy reads it."""
        ...


@dataclass(frozen=True)
class FullRank:
    def ranks(self, units: Units, budget: float) -> list[int]:
        return list(units.caps)


@dataclass(frozen=True)
class FixedRank:
    target: int

    def ranks(self, units: Units, budget: float) -> list[int]:
        return [min(self.target, c) for c in units.caps]


@dataclass(frozen=True)
class SplitRank:
    """``key_share`` of the budget to keys, the rest to values; within a kind every unit gets the same rank."""

    key_share: float

    def ranks(self, units: Units, budget: float) -> list[int]:
        k = units.shares.shape[-1]
        ranks = []
        for kind, share in (("k", self.key_share), ("v", 1.0 - self.key_share)):
            idx = [i for i, kd in enumerate(units.kinds) if kd == kind]
            unit = sum(units.per_rank[i] for i in idx)
            r = int(budget * share // unit) if unit else k
            ranks += [max(min(r, units.caps[i]), units.floors[i]) for i in idx]
        return ranks


@dataclass(frozen=True)
class AdaptiveRank:
    def ranks(self, units: Units, budget: float) -> list[int]:
        return choose_ranks_linear(units.scores, units.per_rank, budget, units.floors)


def choose_ranks_linear(
    energies: torch.Tensor | np.ndarray, rank_cost: Sequence[int], budget: float, min_ranks: Sequence[int]
) -> list[int]:
    """Energy-per-byte rank allocation when every component of a unit costs the same bytes (vectorised).

    energies: (units, k), each row the share of that unit's squared norm per component, descending;
    rank_cost[u]: bytes of one component of unit u; min_ranks[u]: floor. Components are taken in order of
    energy per byte while the total fits ``budget``; each unit keeps a prefix of its spectrum because its
    scores are sorted. Returns one rank per unit.
    """
    # numpy: a few hundred scores, where each torch call would cost more than its work.
    if isinstance(energies, torch.Tensor):
        energies = energies.detach().to("cpu", torch.float64).numpy()
    e = np.asarray(energies, dtype=np.float64)
    units, k = e.shape
    cost = np.asarray(rank_cost, dtype=np.float64)
    floors = np.minimum(np.asarray(min_ranks, dtype=np.int64), k)
    spent = float((floors * cost).sum())
    score = e / np.maximum(cost, 1)[:, None]
    score[np.arange(k)[None, :] < floors[:, None]] = -np.inf
    flat = score.ravel()
    order = np.argsort(-flat, kind="stable")
    order = order[np.isfinite(flat[order])]
    fits = np.cumsum(cost[order // k]) <= (budget - spent)
    n_take = int(np.cumprod(fits).sum())
    ranks = floors + np.bincount(order[:n_take] // k, minlength=units)
    return [int(r) for r in ranks]


def pad_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Score rows of different lengths as one (units, widest) array: the missing components of shorter units
    (short chunks have fewer) score -inf and are never taken."""
    energies = np.full((len(rows), max(r.size for r in rows)), -np.inf)
    for u, r in enumerate(rows):
        energies[u, : r.size] = r
    return energies
