"""Dropout whose masks are drawn as 31-bit random integers, and attention that uses it.

torch's CPU dropout draws its mask with ``bernoulli_``, measured 5-6x slower than filling an int32
tensor with ``random_`` (uniform on [0, 2^31)) and comparing it with p * 2^31: the same Bernoulli(1 - p)
keep mask (p rounded down to a multiple of 2^-31), the same inverted scaling by 1 / (1 - p), from
torch's generator (so ``torch.manual_seed`` still fixes it), only a different draw. With dropout 0.5 on
every sequence view this is 6% of a SASRec step and 12% of a CAMMSR step with three modalities
(benchmarks/README.md). SDPA draws its attention dropout internally (with ``bernoulli_``), so
`attention` spells out the same math (scores, causal or given mask, softmax, dropout, values) when
it drops, and calls SDPA otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A float mask of ``x``'s shape: 1 / (1 - p) with probability 1 - p, else 0."""
    bits = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # uniform on [0, 2^31)
    return (bits >= int(p * 2**31)).to(x.dtype).mul_(1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool, fast: bool = True) -> torch.Tensor:
    """Inverted dropout of ``x``; ``fast=False`` is ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if not fast or p >= 1.0:
        return F.dropout(x, p, training)
    return x * keep_mask(x, p)


class Dropout(nn.Module):
    """`dropout` as a module; ``fast=False`` behaves as ``nn.Dropout``."""

    def __init__(self, p: float, fast: bool = True) -> None:
        super().__init__()
        self.p, self.fast = p, fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.fast)

    def extra_repr(self) -> str:
        return f"p={self.p}, fast={self.fast}"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float,
              training: bool, fast: bool = True) -> torch.Tensor:
    """Scaled dot-product attention, causal (``mask`` None) or under a boolean ``mask`` (True = visible).

    q: [S, h, Lq, d_h]; k, v: [S, h, L, d_h]; mask broadcastable to [S, h, Lq, L] -> [S, h, Lq, d_h].
    """
    drop = training and p > 0.0
    if not (drop and fast):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=p if drop else 0.0)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [S, h, Lq, L]
    if mask is None:
        mask = torch.ones(att.shape[-2:], dtype=torch.bool, device=att.device).tril()  # [Lq, L], Lq == L
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att * keep_mask(att, p)) @ v  # [S, h, Lq, d_h]
