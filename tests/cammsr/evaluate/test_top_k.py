"""cammsr/evaluate/top_k.py: the grouped top-k equals a full sort of every row, ties and -inf included."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cammsr.evaluate import top_k as top_k_module
from cammsr.evaluate.top_k import GROUP_SIZE, MIN_COLUMNS, order_keys, top_k


def reference(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full sort of each row: score descending, then column ascending."""
    s = scores.numpy()
    cols = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    order = np.lexsort((cols, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def scores_of(rng: np.random.Generator, rows: int, cols: int, *, ties: bool, excluded: float) -> torch.Tensor:
    s = rng.standard_normal((rows, cols)).astype(np.float32)
    if ties:  # few distinct values: many exact ties, also across groups at the k-th place
        s = np.round(s * 2) / 2
    s[rng.random(s.shape) < excluded] = -np.inf
    s[:, 0] = -np.inf  # the padding column
    return torch.from_numpy(s)


@pytest.mark.parametrize("cols", [7, 300, MIN_COLUMNS + 37, 12_000])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_equals_a_full_sort(cols, ties):
    rng = np.random.default_rng(cols + ties)
    scores = scores_of(rng, 130, cols, ties=ties, excluded=0.05)
    values, columns = top_k(scores, 20)
    want_values, want_columns = reference(scores, 20)
    assert np.array_equal(columns, want_columns)
    assert np.array_equal(values, want_values)


def test_grouped_path_is_taken_and_exact_on_real_valued_scores(monkeypatch):
    # the fallback (every column) must not be what makes a large catalog exact
    calls = []
    full = top_k_module._top_k_full
    monkeypatch.setattr(top_k_module, "_top_k_full", lambda s, k: calls.append(len(s)) or full(s, k))
    scores = scores_of(np.random.default_rng(1), 64, 5000, ties=False, excluded=0.01)
    values, columns = top_k(scores, 20)
    assert calls == []
    assert np.array_equal(columns, reference(scores, 20)[1])


def test_a_tie_between_groups_at_the_kth_place_falls_back_to_every_column(monkeypatch):
    # column c is in group c mod G: the best value in two groups, k = 1, the lower column must win
    calls = []
    full = top_k_module._top_k_full
    monkeypatch.setattr(top_k_module, "_top_k_full", lambda s, k: calls.append(len(s)) or full(s, k))
    N = MIN_COLUMNS + 5
    G = N // GROUP_SIZE
    scores = torch.full((3, N), -1.0)
    scores[0, [11, 10]] = 5.0  # groups 11 and 10
    scores[1, [10 + 3 * G, 12]] = 5.0  # groups 10 and 12: column 12 is lower
    scores[2, [10, 10 + G]] = 5.0  # one group: no tie between groups, no fallback
    values, columns = top_k(scores, 1)
    assert columns[:, 0].tolist() == [10, 12, 10]
    assert values[:, 0].tolist() == [5.0, 5.0, 5.0]
    assert calls == [2]  # the two tied rows, once


def test_rows_with_fewer_than_k_scorable_items_end_in_minus_infinity():
    scores = torch.full((2, MIN_COLUMNS + 1), float("-inf"))
    scores[0, [3, 900]] = torch.tensor([1.0, 2.0])
    values, columns = top_k(scores, 4)
    assert columns[0, :2].tolist() == [900, 3] and np.isneginf(values[0, 2:]).all()
    assert np.isneginf(values[1]).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=32), min_size=2, max_size=40))
def test_order_keys_sort_like_the_floats_then_the_lower_column(values):
    v = np.array(values, dtype=np.float32)
    cols = np.arange(len(v))
    keys = order_keys(v, cols, len(v))
    by_keys = np.argsort(-keys, kind="stable")
    by_floats = np.lexsort((cols, -v))
    assert by_keys.tolist() == by_floats.tolist()
