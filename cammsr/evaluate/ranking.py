"""Batched full ranking: score every item for every user, rank each held-out target."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cammsr.data.batches import pad_right
from cammsr.evaluate.metrics import target_ranks

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(seq LongTensor [B, L], lengths LongTensor [B]) -> scores FloatTensor [B, N+1]."""


def rank_targets(score_fn: ScoreFn, histories: Sequence[np.ndarray], targets: np.ndarray,
                 batch_size: int = 1024, mask_history: bool = False,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """0-based rank of each target among all N items (column 0, padding, never ranks).

    With ``mask_history`` the user's earlier items are removed from the ranking (scored -inf),
    except the target itself, so a repeat purchase can still be a hit.
    Users are scored in length order (less padding) and ranks returned in input order.
    """
    return rank_targets_by_protocol(score_fn, histories, targets, batch_size, (mask_history,), device)[mask_history]


def rank_targets_by_protocol(score_fn: ScoreFn, histories: Sequence[np.ndarray], targets: np.ndarray,
                             batch_size: int = 1024, masks: Sequence[bool] = (False, True),
                             device: torch.device | str = "cpu") -> dict[bool, np.ndarray]:
    """`rank_targets` under each history-masking choice in ``masks``, scoring every user once."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    ranks = {mask: np.empty(len(histories), dtype=np.int64) for mask in masks}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seq = pad_right([histories[i] for i in idx]).to(device)  # [B, L]
        tgt = torch.from_numpy(targets[idx]).to(device)  # [B]
        scores = score_fn(seq, torch.from_numpy(lengths[idx]).to(device)).float()  # [B, N+1]
        scores[:, 0] = float("-inf")
        for mask in sorted(masks):  # unmasked first: masking writes into the scores
            if mask:
                keep = scores.gather(1, tgt[:, None])
                scores.scatter_(1, seq, float("-inf"))
                scores.scatter_(1, tgt[:, None], keep)
            ranks[mask][idx] = target_ranks(scores, tgt).cpu().numpy()
    return ranks


def popularity_scorer(train_seqs: Sequence[np.ndarray], num_items: int) -> ScoreFn:
    """Most-popular baseline: an item's score is its count in the training parts of the sequences."""
    counts = np.bincount(np.concatenate(list(train_seqs)) if train_seqs else np.zeros(0, np.int64),
                         minlength=num_items + 1).astype(np.float32)
    table = torch.from_numpy(counts)  # [N+1]

    def score(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return table.to(seq.device).expand(len(seq), -1).clone()

    return score
