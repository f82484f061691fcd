import numpy as np
import torch

from cammsr.data.batches import pad_right
from cammsr.evaluate.baselines import FUSION_BETAS, best_fusion_beta, content_knn_scorer, late_fusion
from cammsr.evaluate.ranking import FactoredScores, rank_targets


def _features(rows: list[list[float]], present: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.tensor([[0.0] * len(rows[0]), *rows])  # row 0 = padding
    return feats, torch.tensor([False, *present])


def test_content_knn_scores_by_hand():
    # at full width the principal directions are a rotation: scores are the features' own dot products
    feats, present = _features([[1, 0], [0, 1], [0.6, 0.8], [0, 0]], [True, True, True, False])
    knn = content_knn_scorer(feats, present, dims=2, taps=(1.0, 0.5, 0.25))
    seq = pad_right([np.array([1, 2]), np.array([3])])  # the first user: 1 then 2 (no third item back)
    scores = knn(seq, torch.tensor([2, 1]))
    # user 0 = 1 * f2 + 0.5 * f1 = (0.5, 1): items 1..4 -> 0.5, 1.0, 0.3 + 0.8, 0 (absent); user 1 = f3
    np.testing.assert_allclose(scores[0, 1:].numpy(), [0.5, 1.0, 1.1, 0.0], atol=1e-6)
    np.testing.assert_allclose(scores[1, 1:].numpy(), [0.6, 0.8, 1.0, 0.0], atol=1e-6)
    assert scores[0, 0] == float("-inf")  # padding never ranks


def test_content_knn_keeps_the_top_principal_directions():
    gen = np.random.default_rng(0)
    raw = gen.normal(size=(30, 8)) * np.array([5, 4, 3, 0.1, 0.1, 0.1, 0.1, 0.1])  # 3 strong directions
    feats, present = _features(raw.tolist(), [True] * 30)
    knn = content_knn_scorer(feats, present, dims=3, taps=(1.0,))
    x = raw - raw.mean(0)
    vh = np.linalg.svd(x, full_matrices=False)[2][:3]
    table = raw @ vh.T  # [30, 3]
    seq = pad_right([np.array([4, 7]), np.array([9])])
    expected = np.stack([table[6] @ table.T, table[8] @ table.T])  # the last item of each user
    np.testing.assert_allclose(knn(seq, torch.tensor([2, 1]))[:, 1:].numpy(), expected, rtol=1e-4, atol=1e-4)
    # and it ranks like any scorer: the last item's nearest neighbour is itself
    ranks = rank_targets(knn, [np.array([4, 7])], np.array([7]))
    assert ranks.tolist() == [0]


def test_content_knn_needs_two_items_with_features():
    feats, present = _features([[1, 0], [0, 1]], [True, False])
    assert content_knn_scorer(feats, present) is None
    assert content_knn_scorer(torch.zeros(3, 0), torch.tensor([False, True, True])) is None


def test_late_fusion_adds_the_weighted_knn_score_and_the_weight_is_picked_on_validation():
    gen = torch.Generator().manual_seed(0)
    def users(width: int, scale: float):
        return lambda seq, lengths: seq[:, :1].float() * torch.ones(1, width) * scale

    model = FactoredScores(users(3, 1.0), torch.randn(6, 3, generator=gen))
    knn = FactoredScores(users(2, 0.5), torch.randn(6, 2, generator=gen))
    seq, lengths = pad_right([np.array([1, 2]), np.array([3])]), torch.tensor([2, 1])
    fused = late_fusion(model, knn, 2.0)(seq, lengths)
    expected = model(seq, lengths) + 2.0 * knn(seq, lengths)
    torch.testing.assert_close(fused[:, 1:], expected[:, 1:])
    assert (fused[:, 0] == float("-inf")).all()

    # a target the model ranks last of 5 and the kNN first: item 5 (0 + 1.5 beta) passes item j (5 - j +
    # 0.3 j beta) once beta > 10/3, so 4 and 8 rank it first and the smaller of the two is picked
    hist, targets = [np.array([1])], np.array([5])
    model = FactoredScores(lambda seq, lengths: torch.ones(len(seq), 1), torch.arange(6.0)[:, None].flip(0))
    knn = FactoredScores(lambda seq, lengths: torch.ones(len(seq), 1), torch.arange(6.0)[:, None] * 0.3)
    beta, ndcg = best_fusion_beta(model, knn, lambda fn: rank_targets(fn, hist, targets))
    assert beta == 4.0 and ndcg[4.0] == ndcg[8.0] == 1.0 and ndcg[2.0] < 1.0 and max(FUSION_BETAS) == 8.0
    beta, ndcg = best_fusion_beta(model, model, lambda fn: rank_targets(fn, hist, targets))
    assert beta == 0.0 and len(set(ndcg.values())) == 1  # the same ranking at every weight: the model


def test_remembered_user_vectors_are_computed_once_per_batch():
    from cammsr.evaluate.baselines import remembered

    calls = []

    def users(seq, lengths):
        calls.append(len(seq))
        return seq[:, :1].float()

    scorer = remembered(FactoredScores(users, torch.arange(4.0)[:, None]))
    a, b = pad_right([np.array([1, 2])]), pad_right([np.array([3])])
    first = scorer(a, torch.tensor([2]))
    assert torch.equal(scorer(a, torch.tensor([2])), first) and calls == [1]
    scorer(b, torch.tensor([1]))
    scorer(a, torch.tensor([1]))  # another length is another batch
    assert calls == [1, 1, 1]
