"""Popularity buckets: tail = seen < 5 times in training, head = the top fifth of the rest."""

import numpy as np

from cammsr.evaluate.buckets import bucket_metrics, popularity_buckets, training_counts


def test_buckets_by_training_count():
    counts = training_counts([np.array([1, 1, 1, 1, 1, 2, 2]), np.array([3] * 9 + [4] * 6 + [5] * 5 + [6] * 8)], 7)
    assert counts.tolist() == [0, 5, 2, 9, 6, 5, 8, 0]
    labels = popularity_buckets(counts)
    # not tail: items 1, 3, 4, 5, 6 (>= 5); head = round(0.2 * 5) = 1 item, the most seen: item 3
    assert labels.tolist() == ["tail", "torso", "tail", "head", "torso", "torso", "torso", "tail"]


def test_bucket_metrics_by_hand():
    labels = np.array(["tail", "head", "tail", "torso"], dtype=object)
    targets = np.array([1, 2, 2, 3])  # head, tail, tail, torso
    ranks = {"model": np.array([0, 1, 20, 2]), "popularity": np.array([5, 50, 50, 0])}
    out = bucket_metrics(ranks, targets, labels)
    assert out["tail"]["users"] == 2 and out["head"]["users"] == 1 and out["torso"]["users"] == 1
    assert out["tail"]["model"]["hr@10"] == 0.5
    assert np.isclose(out["tail"]["model"]["ndcg@10"], 0.5 / np.log2(3))  # rank 1 -> 1/log2(3), rank 20 -> 0
    assert out["head"]["model"]["ndcg@10"] == 1.0 and out["torso"]["popularity"]["ndcg@10"] == 1.0
