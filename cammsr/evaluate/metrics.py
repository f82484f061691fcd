"""Full-ranking metrics: HR, NDCG and MRR at k from the rank of each user's target.

Ranks are 0-based: rank 0 is the top of the list. Ties count against the target (an item
scoring the same as the target is ranked above it), so a model that scores everything equal
ranks every target last, never first.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

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

    Two passes over the scores: a row max (NaN propagates through it, so NaN or +inf anywhere in a
    row shows up there) and the count. On CPU the count runs in numpy (`_count_at_least`): torch's
    compare + bool ``sum`` over [B, N] took 4-6x longer (benchmarks/README.md).
    """
    scores = scores.detach()
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    if not torch.isfinite(target_scores).all():
        bad = (~torch.isfinite(target_scores.squeeze(1))).nonzero().squeeze(1)[:5].tolist()
        raise NonFiniteScoresError(f"non-finite target score for batch rows {bad}: ranking stopped")
    row_max = scores.amax(dim=1)  # [B]
    if torch.isnan(row_max).any() or torch.isposinf(row_max).any():
        raise NonFiniteScoresError("NaN or +inf among item scores: ranking stopped")
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(_count_at_least(scores.contiguous().numpy(), target_scores.numpy())) - 1
    return (scores >= target_scores).sum(dim=1) - 1


def _count_at_least(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per row, the number of entries >= that row's threshold: scores [B, N], thresholds [B, 1] -> [B].

    Row by row into one reused bool buffer per thread: ``np.count_nonzero`` over a whole 1-D array
    is the vectorised popcount, while ``axis=1`` falls back to a bool -> int64 sum (2x slower).
    """
    out = np.empty(len(scores), dtype=np.int64)

    def rows(span: range) -> None:
        hit = np.empty(scores.shape[1], dtype=bool)
        for i in span:
            np.greater_equal(scores[i], thresholds[i, 0], out=hit)
            out[i] = np.count_nonzero(hit)

    threads = max(1, min(torch.get_num_threads(), len(scores) // 64))
    spans = [range(len(scores))[k::threads] for k in range(threads)]
    if threads == 1:
        rows(spans[0])
    else:  # numpy releases the GIL in the compare and the count
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(rows, spans))
    return out


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
