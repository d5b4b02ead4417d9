"""The candidate subset of a round: its size, what it carries, its seed (`method.candidates`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magral_core.method.candidates import CandidateRule, candidate_positions


def test_a_pool_at_or_below_the_threshold_is_ranked_whole() -> None:
    rule = CandidateRule(above=50, factor=2, carry=5)
    assert not rule.applies(50) and rule.applies(51)
    np.testing.assert_array_equal(candidate_positions(50, 10, rule, [3, 4], seed=0), np.arange(50))


def test_the_subset_is_the_carried_positions_plus_factor_times_budget_random_others() -> None:
    rule = CandidateRule(above=0, factor=3, carry=4)
    chosen = candidate_positions(1000, 10, rule, [7, 7, 999, 5000, 12, 13, 14, 15], seed=1)
    # duplicates and positions outside the pool are skipped; only the first `carry` distinct ones are kept
    assert {7, 999, 12, 13} <= set(chosen.tolist())
    assert len(chosen) == 4 + 30 and len(set(chosen.tolist())) == len(chosen)
    assert np.all(np.diff(chosen) > 0)


def test_the_random_part_is_seeded_and_differs_between_seeds() -> None:
    rule = CandidateRule(above=0, factor=5, carry=0)
    a = candidate_positions(10_000, 20, rule, [], seed=(0, 1, 2))
    np.testing.assert_array_equal(a, candidate_positions(10_000, 20, rule, [], seed=(0, 1, 2)))
    assert not np.array_equal(a, candidate_positions(10_000, 20, rule, [], seed=(0, 1, 3)))


def test_a_small_pool_gives_every_position_once() -> None:
    rule = CandidateRule(above=0, factor=10, carry=3)
    np.testing.assert_array_equal(candidate_positions(12, 5, rule, [11, 0], seed=0), np.arange(12))


def test_bad_rules_and_budgets_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match="factor >= 1"):
        CandidateRule(above=0, factor=0, carry=0)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        candidate_positions(10, 0, CandidateRule(0, 1, 0), [], seed=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 30), st.integers(1, 6), st.integers(0, 40),
       st.lists(st.integers(-5, 450), max_size=60), st.integers(0, 2**31))
def test_candidates_are_distinct_pool_positions_of_bounded_number(
    pool: int, budget: int, factor: int, carry: int, carried: list[int], seed: int
) -> None:
    chosen = candidate_positions(pool, budget, CandidateRule(0, factor, carry), carried, seed)
    kept = _first_distinct(carried, pool, carry)
    assert len(set(chosen.tolist())) == len(chosen) and np.all((chosen >= 0) & (chosen < pool))
    assert kept <= set(chosen.tolist())
    assert len(chosen) == min(pool, len(kept) + factor * budget)


def _first_distinct(carried: list[int], pool: int, carry: int) -> set[int]:
    out: list[int] = []
    for c in carried:
        if len(out) == carry:
            break
        if 0 <= c < pool and c not in out:
            out.append(c)
    return set(out)
