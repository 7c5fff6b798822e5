"""Rank allocation: the vectorised energy-per-byte allocation the cache uses (`choose_ranks_linear`) against a
greedy heap reference and hand-computed cases; budgets and floors hold (values)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunked_decomp.compression.ranks import choose_ranks_linear


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- references: a greedy heap allocation and the best uniform rank, written for clarity -----------------
def choose_ranks_fixed(
    unit_cost: Sequence[Callable[[int], int]],
    budget: float,
    full_ranks: Sequence[int],
    min_ranks: Sequence[int],
) -> list[int]:
    """The largest common rank r (at least each unit's floor) whose total bytes fit ``budget``.

    unit_cost[u](r): bytes unit u stores at rank r. Returns one rank per unit.
    """
    best = [min(f, m) for f, m in zip(full_ranks, min_ranks)]
    for r in range(1, max(full_ranks) + 1):
        ranks = [max(min(r, f), m) for f, m in zip(full_ranks, min_ranks)]
        if sum(c(k) for c, k in zip(unit_cost, ranks)) > budget:
            break
        best = ranks
    return best


def choose_ranks_adaptive(
    energies: Sequence[torch.Tensor],
    unit_cost: Sequence[Callable[[int], int]],
    budget: float,
    min_ranks: Sequence[int],
) -> list[int]:
    """Greedy energy-per-byte allocation of rank across units within ``budget`` bytes.

    energies[u]: (k_u,) share of unit u's squared Frobenius norm carried by each component, descending.
    Components are taken in order of energy gained per byte added, each unit's floor first; because energies
    are sorted within a unit, every unit keeps a prefix of its spectrum. Returns one rank per unit.
    """
    ranks = [min(int(m), int(e.numel())) for m, e in zip(min_ranks, energies)]
    spent = sum(c(r) for c, r in zip(unit_cost, ranks))
    heap: list[tuple[float, int]] = []
    for u, e in enumerate(energies):
        if ranks[u] < e.numel():
            step = unit_cost[u](ranks[u] + 1) - unit_cost[u](ranks[u])
            heap.append((-float(e[ranks[u]]) / max(step, 1), u))
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        step = unit_cost[u](ranks[u] + 1) - unit_cost[u](ranks[u])
        if spent + step > budget:
            continue
        ranks[u] += 1
        spent += step
        e = energies[u]
        if ranks[u] < e.numel():
            nstep = unit_cost[u](ranks[u] + 1) - unit_cost[u](ranks[u])
            heapq.heappush(heap, (-float(e[ranks[u]]) / max(nstep, 1), u))
    return ranks


# ---- rank policies ------------------------------------------------------------------------------------------
def _linear_cost(per_rank: int, base: int = 0):
    return lambda r: 0 if r == 0 else base + per_rank * r


def _spectrum_energy(s: torch.Tensor) -> torch.Tensor:
    e = s.double() ** 2
    return (e / e.sum()).float()


def test_adaptive_takes_the_globally_largest_components_at_equal_cost() -> None:
    energies = [
        torch.tensor([0.5, 0.3, 0.2]),
        torch.tensor([0.9, 0.05, 0.05]),
        torch.tensor([0.4, 0.35, 0.25]),
    ]
    costs = [_linear_cost(10)] * 3
    ranks = choose_ranks_adaptive(energies, costs, budget=50, min_ranks=[0, 0, 0])
    # The five largest: 0.9, 0.5, 0.4, 0.35, 0.3 -> ranks [2, 1, 2].
    assert ranks == [2, 1, 2]


@settings(max_examples=40, deadline=None)
@given(
    units=st.integers(1, 8),
    k=st.integers(1, 16),
    budget=st.integers(0, 4000),
    floor_ratio=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_property_adaptive_respects_budget_and_floors(units, k, budget, floor_ratio, seed) -> None:
    g = _gen(seed)
    energies = [
        _spectrum_energy(torch.rand(k, generator=g).sort(descending=True).values) for _ in range(units)
    ]
    costs = [_linear_cost(int(torch.randint(4, 40, (1,), generator=g)), int(torch.randint(0, 20, (1,), generator=g)))
             for _ in range(units)]  # fmt: skip
    floors = [math.ceil(floor_ratio * k)] * units
    ranks = choose_ranks_adaptive(energies, costs, budget, floors)
    assert all(f <= r <= k for f, r in zip(floors, ranks, strict=True))
    floor_cost = sum(c(f) for c, f in zip(costs, floors, strict=True))
    spent = sum(c(r) for c, r in zip(costs, ranks, strict=True))
    assert spent <= max(budget, floor_cost)
    # Greedy leaves no unit that could still grow by one within the budget.
    for u in range(units):
        if ranks[u] < k:
            assert spent + costs[u](ranks[u] + 1) - costs[u](ranks[u]) > budget or spent < floor_cost


def test_adaptive_beats_uniform_ranks_on_skewed_spectra() -> None:
    k = 16
    decays = [0.2, 0.5, 0.9, 1.0]  # from a nearly rank-1 unit to a flat one
    energies = [_spectrum_energy(torch.tensor([d**i for i in range(k)])) for d in decays]
    costs = [_linear_cost(48, base=8)] * len(decays)
    floors = [0] * len(decays)
    for budget in (600, 1200, 2000):
        adaptive = choose_ranks_adaptive(energies, costs, budget, floors)
        uniform = choose_ranks_fixed(costs, budget, [k] * len(decays), floors)
        assert sum(c(r) for c, r in zip(costs, adaptive, strict=True)) <= budget
        assert sum(c(r) for c, r in zip(costs, uniform, strict=True)) <= budget
        captured = [
            sum(float(e[:r].sum()) for e, r in zip(energies, ranks, strict=True))
            for ranks in (adaptive, uniform)
        ]
        assert captured[0] > captured[1] + 0.05, (budget, adaptive, uniform, captured)
        assert adaptive[0] <= adaptive[-1]  # the steep unit never gets more components than the flat one
    assert adaptive[0] < adaptive[-1]


def test_choose_ranks_fixed_hand_computed() -> None:
    costs = [_linear_cost(10), _linear_cost(10), _linear_cost(20)]
    # Common rank r costs 10r + 10r + 20r = 40r; budget 130 -> r = 3 (120).
    assert choose_ranks_fixed(costs, 130, [8, 8, 8], [0, 0, 0]) == [3, 3, 3]
    # Unit 1 is capped at its full rank 2; r = 4 costs 40 + 20 + 80 = 140 > 130, r = 3: 30 + 20 + 60 = 110.
    assert choose_ranks_fixed(costs, 130, [8, 2, 8], [0, 0, 0]) == [3, 2, 3]
    # Floors hold even when they overrun the budget.
    assert choose_ranks_fixed(costs, 0, [8, 8, 8], [1, 2, 0]) == [1, 2, 0]


# ---- choose_ranks_linear: the allocation the cache uses --------------------------------------------------------


def test_choose_ranks_linear_hand_computed() -> None:
    # Unit 0 costs 10 bytes per component, unit 1 costs 20; scores = energy / cost.
    energies = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.08, 0.02]])
    # Scores: u0 0.05 0.03 0.02, u1 0.045 0.004 0.001 → order u0c0, u1c0, u0c1, u0c2, u1c1, u1c2.
    assert choose_ranks_linear(energies, [10, 20], budget=30, min_ranks=[0, 0]) == [1, 1]
    assert choose_ranks_linear(energies, [10, 20], budget=50, min_ranks=[0, 0]) == [3, 1]
    assert choose_ranks_linear(energies, [10, 20], budget=49, min_ranks=[0, 0]) == [2, 1]
    # Floors are paid first from the same budget; the walk stops at the first component that does not fit.
    assert choose_ranks_linear(energies, [10, 20], budget=40, min_ranks=[0, 2]) == [0, 2]
    assert choose_ranks_linear(energies, [10, 20], budget=0, min_ranks=[1, 1]) == [1, 1]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    units=st.integers(1, 6),
    k=st.integers(1, 12),
    budget=st.floats(0, 400),
)
def test_choose_ranks_linear_equals_the_greedy_reference_at_equal_costs(seed, units, k, budget) -> None:
    g = torch.Generator().manual_seed(seed)
    energies = torch.rand(units, k, generator=g).sort(dim=-1, descending=True).values
    floors = torch.randint(0, k + 1, (units,), generator=g).tolist()
    cost = 7
    linear = choose_ranks_linear(energies, [cost] * units, budget, floors)
    greedy = choose_ranks_adaptive(list(energies), [lambda r: cost * r] * units, budget, floors)
    assert linear == greedy


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), units=st.integers(1, 6), k=st.integers(1, 12), budget=st.floats(0, 2000))
def test_choose_ranks_linear_takes_the_best_components_within_budget(seed, units, k, budget) -> None:
    g = torch.Generator().manual_seed(seed)
    energies = torch.rand(units, k, generator=g).sort(dim=-1, descending=True).values
    costs = torch.randint(1, 40, (units,), generator=g).tolist()
    floors = torch.randint(0, k + 1, (units,), generator=g).tolist()
    ranks = choose_ranks_linear(energies, costs, budget, floors)
    assert all(f <= r <= k for f, r in zip(floors, ranks))
    extra = sum((r - f) * c for r, f, c in zip(ranks, floors, costs))
    assert extra <= max(budget - sum(f * c for f, c in zip(floors, costs)), 0) + 1e-9
    # Every component taken beyond the floors scores at least as well as every one left out.
    taken = [float(energies[u, j]) / costs[u] for u in range(units) for j in range(floors[u], ranks[u])]
    left = [float(energies[u, j]) / costs[u] for u in range(units) for j in range(ranks[u], k)]
    if taken and left:
        assert min(taken) >= max(left) - 1e-12
