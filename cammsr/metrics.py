"""Full-ranking metrics: HR, NDCG and MRR at k from the rank of each user's target.

Ranks are 0-based: rank 0 is the top of the list. Ties count against the target (an item
scoring the same as the target is ranked above it), so a model that scores everything equal
ranks every target last, never first.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


class NonFiniteScoresError(ValueError):
    """A score was NaN or infinite where a real number is needed; ranking it would be meaningless."""


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each target among all scored items.

    Args:
        scores: FloatTensor [B, N] scores for every item (masked items at -inf are allowed).
        targets: LongTensor [B] column index of each user's target.

    Returns:
        LongTensor [B]: number of items that score >= the target, excluding the target itself.
    """
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    if not torch.isfinite(target_scores).all():
        bad = (~torch.isfinite(target_scores.squeeze(1))).nonzero().squeeze(1)[:5].tolist()
        raise NonFiniteScoresError(f"non-finite target score for batch rows {bad}: ranking stopped")
    if torch.isnan(scores).any() or torch.isposinf(scores).any():
        raise NonFiniteScoresError("NaN or +inf among item scores: ranking stopped")
    return (scores >= target_scores).sum(dim=1) - 1


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """HR@k, NDCG@k, MRR@k averaged over users; keys like ``ndcg@10``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if ranks.size else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if ranks.size else 0.0
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean()) if ranks.size else 0.0
    return out
