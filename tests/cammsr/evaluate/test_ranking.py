"""cammsr/evaluate/ranking.py: both protocols from one pass; the model's factored scores; runs by length."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cammsr.data.batches import pad_right
from cammsr.evaluate import ranking
from cammsr.evaluate.ranking import (
    MIN_GROUP,
    PADDING_SLACK,
    FactoredScores,
    length_runs,
    model_scores,
    rank_targets,
    rank_targets_by_protocol,
    score_by_length,
)


def test_both_protocols_in_one_pass_equal_separate_passes():
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.standard_normal((21, 4)).astype(np.float32))
    calls = []

    def score(seq, lengths):
        calls.append(len(seq))
        return table[seq[torch.arange(len(seq)), lengths - 1]] @ table.T  # [B, 21]

    histories = [rng.integers(1, 21, rng.integers(1, 6)) for _ in range(37)]
    targets = np.array([h[-1] if i % 3 == 0 else rng.integers(1, 21) for i, h in enumerate(histories)])
    both = rank_targets_by_protocol(score, histories, targets, batch_size=8)
    assert sum(calls) == 37  # every user scored once
    for mask in (False, True):
        assert np.array_equal(both[mask], rank_targets(score, histories, targets, 8, mask))
    assert (both[True] <= both[False]).all() and (both[True] < both[False]).any()  # masking only lifts


# ------------------------------------------------------------------ the model's factored scores, runs by length

def _model(**overrides):
    from tests.cammsr.model.test_cammsr import make_model

    model = make_model(**overrides).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # far from the init, so that scores differ item to item
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("overrides", [{}, {"content_table": "frozen"}, {"score_refined": True},
                                       {"score_scale": "learned", "use_image": False}, {"num_experts": 0}])
def test_model_scores_rank_as_score_last(overrides):
    model = _model(**overrides)
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 31, rng.integers(1, 9)) for _ in range(60)]
    targets = rng.integers(1, 31, 60)
    factored = model_scores(model)
    seq, lengths = pad_right(histories[:7]), torch.tensor([len(h) for h in histories[:7]])
    assert torch.allclose(factored(seq, lengths), model.score_last(seq, lengths), atol=1e-5)
    for mask in (False, True):
        expected = rank_targets(model.score_last, histories, targets, 16, mask)
        assert np.array_equal(rank_targets(factored, histories, targets, 16, mask), expected)
        assert np.array_equal(rank_targets(factored, histories, targets, 16, mask, precision=torch.bfloat16),
                              expected)


def test_exact_ranks_over_several_spans_equal_one_span(monkeypatch):
    model = _model()
    rng = np.random.default_rng(2)
    histories = [rng.integers(1, 31, rng.integers(1, 9)) for _ in range(70)]
    targets = rng.integers(1, 31, 70)
    one = rank_targets_by_protocol(model_scores(model), histories, targets, 16, precision=torch.bfloat16)
    monkeypatch.setattr(ranking, "RANK_SPAN", 20)  # spans of one batch of 16 users (a whole number of batches)
    assert [len(s) for s in ranking.spans(np.arange(70), 16)] == [16, 16, 16, 16, 6]
    several = rank_targets_by_protocol(model_scores(model), histories, targets, 16, precision=torch.bfloat16)
    for mask in (False, True):
        assert np.array_equal(several[mask], one[mask])
        assert np.array_equal(one[mask], rank_targets(model.score_last, histories, targets, 16, mask))


def test_model_scores_see_the_unknown_ids():
    model = _model()
    model.mark_unknown_ids(torch.arange(31) % 4 == 1)
    seq, lengths = torch.tensor([[1, 2, 5, 0], [3, 4, 6, 9]]), torch.tensor([3, 4])
    assert torch.allclose(model_scores(model)(seq, lengths), model.score_last(seq, lengths), atol=1e-5)
    d = model.cfg.hidden_size
    assert torch.equal(model_scores(model).items[5, :d], model.missing["id"])  # item 5: unknown ID vector


def test_by_length_runs_keep_the_input_order():
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 100, n) for n in rng.integers(1, 51, 700)]
    lengths = np.array([len(h) for h in histories])
    idx = np.argsort(lengths, kind="stable")[50:650]  # a length-sorted batch, as the ranker passes it
    runs = []

    def fn(seq, lens):
        runs.append((seq.shape, lens.clone()))
        return torch.stack([seq[:, 0], lens, seq.shape[1] * torch.ones_like(lens)], 1)  # [b, 3]

    out = score_by_length(fn, histories, idx, lengths, "cpu")
    assert out[:, 0].tolist() == [int(histories[i][0]) for i in idx]  # each row is its user's, in order
    assert out[:, 1].tolist() == lengths[idx].tolist()
    assert len(runs) > 1 and all(shape[0] >= MIN_GROUP for shape, _ in runs[:-1])  # several runs, none tiny
    assert all(int(lens.max()) == shape[1] for shape, lens in runs)  # each run padded to its own longest
    for shape, lens in runs:  # past MIN_GROUP users a run stops before its padding passes the slack
        assert shape[0] <= MIN_GROUP or shape[0] * shape[1] <= (1 + PADDING_SLACK) * int(lens.sum())
    tokens = sum(shape[0] * shape[1] for shape, _ in runs)
    assert tokens < 0.75 * len(idx) * lengths[idx].max()  # one batch padded to its longest: a third more


def test_factored_scores_put_padding_at_minus_infinity():
    items = torch.randn(6, 3)
    scorer = FactoredScores(lambda seq, lengths: items[seq[:, 0]], items)
    scores = scorer(torch.tensor([[2], [4]]), torch.tensor([1, 1]))
    assert scores[:, 0].eq(float("-inf")).all()
    assert torch.allclose(scores[:, 1:], items[[2, 4]] @ items[1:].T)


def _runs_user_by_user(lengths: np.ndarray) -> list[tuple[int, int]]:
    """The rule `length_runs` implements, one user at a time."""
    out, start, n = [], 0, len(lengths)
    while start < n:
        end, total = start, 0
        while end < n:
            total += lengths[end]
            end += 1
            if end - start >= MIN_GROUP and end < n \
                    and lengths[end] * (end + 1 - start) > (1 + PADDING_SLACK) * (total + lengths[end]):
                break
        out.append((start, end))
        start = end
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=1500), st.booleans())
def test_length_runs_follow_the_rule_user_by_user(lengths, skewed):
    lengths = np.sort(np.array(lengths, dtype=np.int64))
    if skewed:  # mostly short, as real histories are
        lengths = np.sort(np.minimum(lengths % 7 + 1, lengths))
    runs = length_runs(lengths)
    assert runs == _runs_user_by_user(lengths)
    assert [s for s, _ in runs[1:]] == [e for _, e in runs[:-1]] and (not runs or runs[-1][1] == len(lengths))


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_capped_ranks_are_the_full_ranks_cut_at_the_cap(precision):
    rng = np.random.default_rng(3)
    table = torch.from_numpy(rng.standard_normal((301, 8)).astype(np.float32))
    table[0] = 0
    users = torch.from_numpy(rng.standard_normal((301, 8)).astype(np.float32)) * 3
    scorer = FactoredScores(lambda seq, lengths: users[seq[torch.arange(len(seq)), lengths - 1]], table)
    histories = [rng.integers(1, 301, rng.integers(1, 9)) for _ in range(200)]
    targets = rng.integers(1, 301, 200)
    full = rank_targets_by_protocol(scorer, histories, targets, 64, precision=precision)
    capped = rank_targets_by_protocol(scorer, histories, targets, 64, precision=precision, cap=10)
    for mask in (False, True):
        assert np.array_equal(capped[mask], np.minimum(full[mask], 10)), mask
        assert (full[mask] < 10).sum() >= 5 and (full[mask] > 10).sum() >= 100  # both sides of the cap
    assert np.array_equal(rank_targets(scorer, histories, targets, 64, True, precision=precision, cap=10),
                          capped[True])
