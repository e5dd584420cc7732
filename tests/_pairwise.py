"""Pairwise-covering parameter grids (STYLE.md: every pair of axis values at least once by default,
the full product behind ``-m slow``)."""

from __future__ import annotations

import itertools
from typing import Callable


def pairwise(axes: dict[str, tuple], cost: Callable[[dict], float] = lambda case: 0.0,
             overhead: float = 1.0) -> list[dict]:
    """A small, deterministic list of cases in which every pair of values of two axes appears.

    Greedy: repeatedly take the case of the full product that covers the most uncovered pairs per
    unit of ``cost(case) + overhead`` (with zero cost: the most pairs); then swap each case, most expensive first, for the
    cheapest one that keeps every pair covered. Fine for products of a few hundred cases.
    """
    names = list(axes)
    product = [dict(zip(names, vals)) for vals in itertools.product(*(axes[n] for n in names))]
    pairs = lambda c: {(a, repr(c[a]), b, repr(c[b])) for a, b in itertools.combinations(names, 2)}  # noqa: E731
    todo = set().union(*(pairs(c) for c in product))
    cases = []
    while todo:
        best = max(product, key=lambda c: (len(pairs(c) & todo) / (cost(c) + overhead), -cost(c)))
        todo -= pairs(best)
        cases.append(best)
    for i in sorted(range(len(cases)), key=lambda i: -cost(cases[i])):
        for cand in sorted(product, key=cost):
            if cost(cand) >= cost(cases[i]):
                break
            trial = cases[:i] + [cand] + cases[i + 1:]
            if covers_every_pair(trial, axes):
                cases = trial
                break
    unique = []
    for c in cases:  # a swap can repeat a case
        if c not in unique:
            unique.append(c)
    return unique


def covers_every_pair(cases: list[dict], axes: dict[str, tuple]) -> bool:
    """True when every pair of values of every two axes appears in some case."""
    names = list(axes)
    for a, b in itertools.combinations(names, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in cases}
        if any((repr(va), repr(vb)) not in seen for va in axes[a] for vb in axes[b]):
            return False
    return True


def full_product(axes: dict[str, tuple]) -> list[dict]:
    names = list(axes)
    return [dict(zip(names, vals)) for vals in itertools.product(*(axes[n] for n in names))]
