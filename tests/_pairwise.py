"""Pairwise-covering parameter grids (STYLE.md: every pair of axis values at least once by default,
the full product behind ``-m slow``): the suite's one generator, and the three tests of a parity
suite on such a grid (``parity_tests``)."""

from __future__ import annotations

import collections
import itertools
from typing import Callable

import pytest

Feasible = Callable[[dict], bool]


def _any(case: dict) -> bool:
    return True


def full_product(axes: dict[str, tuple], feasible: Feasible = _any) -> list[dict]:
    """Every combination of axis values that ``feasible`` accepts, in axis order."""
    names = list(axes)
    return [case for vals in itertools.product(*(axes[n] for n in names))
            if feasible(case := dict(zip(names, vals)))]


def _pairs(case: dict, names: list) -> set:
    return {(a, repr(case[a]), b, repr(case[b])) for a, b in itertools.combinations(names, 2)}


def pairwise(axes: dict[str, tuple], cost: Callable[[dict], float] = lambda case: 0.0,
             overhead: float = 1.0, feasible: Feasible = _any) -> list[dict]:
    """A small, deterministic list of cases in which every pair of values of two axes that some
    feasible case holds appears.

    Greedy: repeatedly take the feasible case of the full product that covers the most uncovered
    pairs per unit of ``cost(case) + overhead`` (with zero cost: the most pairs); then swap each
    case, most expensive first, for the cheapest one that keeps every pair covered. Fine for
    products of a few thousand cases.
    """
    names = list(axes)
    product = full_product(axes, feasible)
    pairs = {id(c): _pairs(c, names) for c in product}
    todo = set().union(*pairs.values())
    cases = []
    while todo:
        best = max(product, key=lambda c: (len(pairs[id(c)] & todo) / (cost(c) + overhead), -cost(c)))
        todo -= pairs[id(best)]
        cases.append(best)
    # Swap: case i may become cand when cand holds every pair that only case i covers.
    count = collections.Counter(p for c in cases for p in pairs[id(c)])
    by_cost = sorted(product, key=cost)
    for i in sorted(range(len(cases)), key=lambda i: -cost(cases[i])):
        only_here = {p for p in pairs[id(cases[i])] if count[p] == 1}
        for cand in by_cost:
            if cost(cand) >= cost(cases[i]):
                break
            if only_here <= pairs[id(cand)]:
                count.subtract(pairs[id(cases[i])])
                count.update(pairs[id(cand)])
                cases[i] = cand
                break
    unique = []
    for c in cases:  # a swap can repeat a case
        if c not in unique:
            unique.append(c)
    return unique


def covers_every_pair(cases: list[dict], axes: dict[str, tuple], feasible: Feasible = _any) -> bool:
    """True when every pair of values of two axes that some feasible case holds appears in ``cases``."""
    names = list(axes)
    seen = set().union(*(_pairs(c, names) for c in cases)) if cases else set()
    if feasible is _any:  # every pair of values is feasible
        return all((a, repr(va), b, repr(vb)) in seen for a, b in itertools.combinations(names, 2)
                   for va in axes[a] for vb in axes[b])
    return all(_pairs(c, names) <= seen for c in full_product(axes, feasible))


def parity_tests(cases: list[dict], axes: dict[str, tuple], check: Callable[[dict], None],
                 ids: Callable[[dict], str]) -> tuple:
    """``(test_grid_covers_every_pair, test_parity_pairwise, test_parity_full)`` for a module to bind
    under those names: ``cases`` (``pairwise(axes)``) cover every pair of ``axes``, and ``check(case)``
    (outputs poisoned) on ``cases`` by default and on the full product behind ``slow``."""

    def test_grid_covers_every_pair():
        assert covers_every_pair(cases, axes)

    @pytest.mark.parametrize("case", cases, ids=ids)
    def test_parity_pairwise(case, poison):
        check(case)

    @pytest.mark.slow
    @pytest.mark.parametrize("case", full_product(axes), ids=ids)
    def test_parity_full(case, poison):
        check(case)

    return test_grid_covers_every_pair, test_parity_pairwise, test_parity_full
