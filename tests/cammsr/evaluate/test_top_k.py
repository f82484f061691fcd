"""Exact top-k selection over score blocks (the grouped top-k)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cammsr.evaluate.metrics import NonFiniteScoresError
from cammsr.evaluate.top_k import GROUP, top_k, top_k_columns


def test_a_nan_score_stops_recommendation():
    scores = torch.tensor([[float("-inf"), 1.0, 3.0, 3.0, -2.0], [float("-inf"), 0.5, float("-inf"), 2.0, 1.0]])
    values, cols = top_k(scores, 3)  # -inf is fine: padding and excluded items
    assert cols.tolist() == [[2, 3, 1], [3, 4, 1]] and values[0].tolist() == [3.0, 3.0, 1.0]  # ties: lower index
    for bad in (float("nan"), float("inf")):
        broken = scores.clone()
        broken[1, 3] = bad
        with pytest.raises(NonFiniteScoresError, match=r"batch rows \[1\]"):
            top_k(broken, 3)


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

