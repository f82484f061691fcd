"""Dropout whose masks are drawn as 15-bit random integers, and attention that uses it.

torch's CPU dropout draws its mask with ``bernoulli_``, measured 5-6x slower than filling an int32
tensor with ``random_`` and comparing it with a threshold, and that ~3x slower than cutting 15-bit
integers out of int64 random words (`keep_mask`): the same Bernoulli(1 - p) keep mask (p rounded down
to a multiple of 2^-15), the same inverted scaling by 1 / (1 - p), from
torch's generator (so ``torch.manual_seed`` still fixes it), only a different draw. With dropout 0.5 on
every sequence view this is 6% of a SASRec step and 12% of a CAMMSR step with three modalities
(benchmarks/README.md). SDPA draws its attention dropout internally (with ``bernoulli_``), so
`attention` spells out the same math (scores, causal or given mask, softmax, dropout, values) when
it drops. On a CPU it spells it out without dropout too: at two heads, SDPA's CPU kernel measured 2-5x
slower forward than the four ops at sequence lengths 3-8, 20 and 30, as fast at 50, 1.2x faster at 15,
and 1.1-5x slower forward + backward (its per-block set-up is made for long sequences); over a toys
ranking pass the encoder took 10% less. Other devices call SDPA when not dropping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A float mask of ``x``'s shape: 1 / (1 - p) with probability 1 - p (p rounded down to a multiple of
    2^-15), else 0.

    Each draw is 15 random bits, four from each 63-bit random word (``random_`` on int64 is uniform on
    [0, 2^63)): a word costs about what one 31-bit draw did, so the mask costs a third of one int32 draw per
    element (measured 18 vs 55 ms for 7.5M elements).
    """
    n = x.numel()
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_()  # uniform on [0, 2^63)
    bits = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF  # [...] each uniform on [0, 2^15)
    return (bits >= int(p * 2**15)).to(x.dtype).mul_(1.0 / (1.0 - p))


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
    if (drop and not fast) or (not drop and q.device.type != "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=p if drop else 0.0)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [S, h, Lq, L]
    if mask is None:
        mask = torch.ones(att.shape[-2:], dtype=torch.bool, device=att.device).tril()  # [Lq, L], Lq == L
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att * keep_mask(att, p) if drop else att) @ v  # [S, h, Lq, d_h]
