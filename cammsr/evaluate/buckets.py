"""Test metrics by how popular the target item was in training: where content should matter most.

Buckets by an item's count in the training parts of the sequences:
- ``tail``: seen fewer than 5 times in training (the ID embedding has little to learn from);
- ``head``: the most popular fifth of the other items, by count;
- ``torso``: the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cammsr.evaluate.metrics import metrics_from_ranks

BUCKETS = ("head", "torso", "tail")
TAIL_BELOW = 5  # training occurrences
HEAD_SHARE = 0.2  # of the items that are not tail


def training_counts(train_seqs: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Occurrences of each item [N+1] in the training parts of the sequences."""
    flat = np.concatenate(list(train_seqs)) if len(train_seqs) else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=num_items + 1)


def popularity_buckets(counts: np.ndarray) -> np.ndarray:
    """Bucket name of each item (index 0 = padding gets ``tail``), from its training count [N+1]."""
    labels = np.full(len(counts), "tail", dtype=object)
    rest = np.flatnonzero(counts >= TAIL_BELOW)
    rest = rest[rest > 0]
    if len(rest):
        order = rest[np.argsort(-counts[rest], kind="stable")]
        n_head = max(1, int(round(HEAD_SHARE * len(order))))
        labels[order[:n_head]] = "head"
        labels[order[n_head:]] = "torso"
    return labels


def bucket_metrics(ranks: Mapping[str, np.ndarray], targets: np.ndarray, labels: np.ndarray,
                   ks: Sequence[int] = (10,)) -> dict[str, dict]:
    """``{bucket: {"users": n, ranker: {metric: value}}}`` for the test targets in each bucket."""
    out: dict[str, dict] = {}
    target_bucket = labels[targets]
    for bucket in BUCKETS:
        sel = target_bucket == bucket
        entry: dict = {"users": int(sel.sum())}
        for ranker, r in ranks.items():
            entry[ranker] = {k: round(v, 6) for k, v in metrics_from_ranks(r[sel], list(ks)).items()} \
                if sel.any() else {}
        out[bucket] = entry
    return out
