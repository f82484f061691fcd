"""Losses of CAMMSR beyond next-item cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, same_target: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Symmetric InfoNCE between two views, positives on the diagonal, in-batch negatives.

    Args:
        a, b: FloatTensor [B, d] the two views of the same B sequences.
        temperature: softmax temperature (HM4SR: 0.2).
        same_target: BoolTensor [B, B], True where two sequences share a target item; those
            off-diagonal pairs are not used as negatives (they are not really negatives).
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = a @ b.T / temperature  # [B, B]
    if same_target is not None:
        off_diag = same_target & ~torch.eye(len(a), dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(off_diag, float("-inf"))
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
