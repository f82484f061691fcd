import math

import numpy as np
import pytest
import torch

from cammsr.evaluate.metrics import NonFiniteScoresError, metrics_from_ranks, target_ranks
from cammsr.evaluate.ranking import popularity_scorer, rank_targets

NEG = float("-inf")
SCORES = torch.tensor([
    [NEG, 0.9, 0.1, 0.2, 0.3],  # target 1 is the top item -> rank 0
    [NEG, 0.1, 0.5, 0.3, 0.5],  # target 4 ties with item 2 -> the tie counts against it -> rank 1
    [NEG, 0.4, 0.3, 0.2, 0.1],  # target 4 is last -> rank 3, outside top 2
])
TARGETS = torch.tensor([1, 4, 4])


def test_ranks_count_ties_against_the_target():
    assert target_ranks(SCORES, TARGETS).tolist() == [0, 1, 3]


def test_metrics_match_hand_computed_values():
    m = metrics_from_ranks(np.array([0, 1, 3]), [1, 2, 5])
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert m["mrr@2"] == pytest.approx((1 + 0.5) / 3)
    assert m["mrr@5"] == pytest.approx((1 + 0.5 + 0.25) / 3)


def test_all_equal_scores_rank_the_target_last_not_first():
    scores = torch.zeros(1, 6)
    scores[:, 0] = NEG
    assert target_ranks(scores, torch.tensor([3])).tolist() == [4]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_stop_ranking(bad):
    scores = SCORES.clone()
    scores[1, 4] = bad
    with pytest.raises(NonFiniteScoresError):
        target_ranks(scores, TARGETS)
    scores = SCORES.clone()
    scores[0, 3] = float("nan")  # a NaN elsewhere in the row: also an error, never a silent hit
    with pytest.raises(NonFiniteScoresError):
        target_ranks(scores, TARGETS)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_fast_path_equals_the_plain_count_on_many_row_blocks(threads):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (300, 400), generator=g).float()  # many ties, several row blocks
    scores[:, 0] = NEG
    targets = torch.randint(1, 400, (300,), generator=g)
    expected = (scores >= scores.gather(1, targets[:, None])).sum(1) - 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(target_ranks(scores, targets), expected)
        scores[250, 399] = float("nan")  # a NaN in a late block, far from the target
        with pytest.raises(NonFiniteScoresError):
            target_ranks(scores, targets)
    finally:
        torch.set_num_threads(before)


def test_rank_targets_masks_history_but_not_the_target():
    table = torch.tensor([0.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # item 1 best ... item 5 worst

    def score(seq, lengths):
        return table.expand(len(seq), -1).clone()

    hist = [np.array([1, 2]), np.array([1, 3])]
    targets = np.array([3, 3])  # user 2 repeats item 3
    plain = rank_targets(score, hist, targets, batch_size=1)
    masked = rank_targets(score, hist, targets, batch_size=1, mask_history=True)
    assert plain.tolist() == [2, 2]
    assert masked.tolist() == [0, 1]  # items 1, 2 removed for user 1; item 1 removed, item 3 kept for user 2


def test_popularity_counts_training_items():
    score = popularity_scorer([np.array([1, 2, 2]), np.array([2, 3])], num_items=4)
    s = score(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    assert s.tolist() == [[0.0, 1.0, 3.0, 1.0, 0.0]]
