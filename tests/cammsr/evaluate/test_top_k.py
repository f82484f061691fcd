"""Exact top-k selection over score blocks (the grouped top-k)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cammsr.evaluate.metrics import NonFiniteScoresError
from cammsr.evaluate.top_k import GROUP, Exclusions, top_k, top_k_columns


@pytest.mark.parametrize("compiled", [True, False])
def test_a_nan_score_stops_recommendation(compiled):
    scores = torch.tensor([[float("-inf"), 1.0, 3.0, 3.0, -2.0], [float("-inf"), 0.5, float("-inf"), 2.0, 1.0]])
    values, cols = top_k(scores, 3, compiled=compiled)  # -inf is fine: padding and excluded items
    assert cols.tolist() == [[2, 3, 1], [3, 4, 1]] and values[0].tolist() == [3.0, 3.0, 1.0]  # ties: lower index
    for bad in (float("nan"), float("inf")):
        broken = scores.clone()
        broken[1, 3] = bad
        with pytest.raises(NonFiniteScoresError, match=r"batch rows \[1\]"):
            top_k(broken, 3, compiled=compiled)


@pytest.mark.parametrize("n", [40, 2048, 2070])  # the plain top-k; whole groups; groups and a remainder
def test_grouped_top_k_returns_exactly_the_k_best_values(n):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 50, (64, n), generator=gen).float()  # many ties, also at the k-th value
    scores[:, 0] = float("-inf")
    scores[:3, : n - 5] = float("-inf")  # rows with fewer than k finite entries
    scores[5] = scores[5].clamp(max=0.0)
    scores[6, n - 1] = 1e6  # the best entry outside the whole groups
    scores[7, : GROUP * 3] = 1e5  # the best entries all in few groups
    for k in (1, 7, 20):
        values, cols, row_max = top_k_columns(scores, k)
        expected = scores.sort(dim=1, descending=True).values[:, :k]
        assert torch.equal(values.sort(dim=1, descending=True).values, expected)
        assert torch.equal(scores.gather(1, cols), values)  # the columns hold those values
        assert all(len(set(row)) == k for row in cols.tolist())  # each column once
        assert torch.equal(row_max, scores.amax(dim=1))
        v, c = top_k(scores, k)  # best first, ties by lower column
        for row in range(len(scores)):
            finite = scores[row].isfinite()
            ranked = sorted(((-float(x), j) for j, x in enumerate(scores[row].tolist()) if finite[j]))[:k]
            kth = -ranked[-1][0]  # at the k-th value itself, which tied column is kept is arbitrary
            got = [(-float(x), int(j)) for x, j in zip(v[row], c[row], strict=True) if np.isfinite(x)]
            assert [x for x in got if -x[0] > kth] == [x for x in ranked if -x[0] > kth]
            assert [x[0] for x in got] == [x[0] for x in ranked]
    broken = scores.clone()
    broken[9, n - 1] = float("nan")  # in the remainder columns (or a group when n is a multiple)

    with pytest.raises(NonFiniteScoresError, match=r"batch rows \[9\]"):
        top_k(broken, 5)



def reference_top_k(scores: np.ndarray, k: int, excluded: list[list[int]]) -> list[list[tuple[float, int]]]:
    """Per row, the k best (score, column) pairs above -inf, best first, equal scores by lower column."""
    out = []
    for row, cut in zip(scores.tolist(), excluded, strict=True):
        pairs = sorted((-x, j) for j, x in enumerate(row) if j not in cut and x != float("-inf"))[:k]
        out.append([(-x, j) for x, j in pairs])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 200), st.integers(1, 25), st.integers(0, 2**31 - 1))
def test_top_k_with_exclusions_equals_a_sort_and_keeps_the_lower_column_on_ties(rows, n, k, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-5, 6, (rows, n)).astype(np.float32)  # few values: ties everywhere, at the k-th too
    scores[rng.random((rows, n)) < 0.1] = -np.inf
    excluded = [sorted(set(rng.integers(0, n, rng.integers(0, 6)).tolist())) for _ in range(rows)]
    expected = reference_top_k(scores, k, excluded)
    values, cols = top_k(torch.from_numpy(scores.copy()), k, Exclusions.of([np.array(e) for e in excluded]))
    for row in range(rows):
        got = [(float(v), int(c)) for v, c in zip(values[row], cols[row], strict=True) if np.isfinite(v)]
        assert got == expected[row]
    # the torch path (any device): the same values; at the k-th value any of the tied columns
    values, cols = top_k(torch.from_numpy(scores.copy()), k, Exclusions.of([np.array(e) for e in excluded]),
                         compiled=False)
    for row in range(rows):
        got = [(float(v), int(c)) for v, c in zip(values[row], cols[row], strict=True) if np.isfinite(v)]
        assert [v for v, _ in got] == [v for v, _ in expected[row]]
        kth = got[-1][0] if got else None
        assert [x for x in got if x[0] != kth] == [x for x in expected[row] if x[0] != kth]
        assert all(np.isfinite(scores[row, c]) and c not in excluded[row] for _, c in got)


def test_exclusions_leave_seen_items_out_and_reject_columns_outside_the_row():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]])
    seen = Exclusions.of([np.array([0, 2]), np.array([3])])
    values, cols = top_k(scores.clone(), 2, seen)
    assert cols.tolist() == [[1, 3], [2, 1]] and values.tolist() == [[8.0, 6.0], [3.0, 2.0]]
    values, cols = top_k(scores.clone(), 2, seen.take(np.array([1, 1])))  # rows picked and repeated
    assert cols.tolist() == [[0, 1], [2, 1]]
    with pytest.raises(ValueError, match=r"outside 0..3 in rows \[1\]"):
        top_k(scores.clone(), 2, Exclusions.of([np.array([1]), np.array([4])]))


def test_the_compiled_selection_matches_the_torch_path():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(50, 3000, generator=gen)
    scores[:, 0] = float("-inf")
    seen = Exclusions.of([np.arange(1, 1 + i) for i in range(50)])
    v_cpu, c_cpu = top_k(scores.clone(), 20, seen)
    v_ref, c_ref = top_k(scores.clone(), 20, seen, compiled=False)  # random scores: no ties
    assert np.array_equal(c_cpu, c_ref) and np.array_equal(v_cpu, v_ref)
