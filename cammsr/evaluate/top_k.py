"""Exact top-k items per user over a block of float32 scores, grouped.

One max over groups of GROUP columns, then only the groups that can hold a row's k best entries are read:
on the CPU by a compiled pass per row (`cammsr.evaluate.row_select`), elsewhere by a top-k over the group
maxima and one over the chosen groups' entries (~1.6x faster than a top-k over all columns). Measured and
not kept: a bfloat16 score matmul with an exact
float64 recheck of each user's best candidates; candidates from the bfloat16 sign test of
`cammsr.evaluate.exact_bf16` against a bar set by the most frequent items (a few users with thousands of
candidates cost more than the matmul saves); numpy's introselect for the two selections (faster on one
thread, not on two, where `torch.topk` runs on both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cammsr.data.batches import PackedSequences
from cammsr.evaluate.metrics import NonFiniteScoresError

GROUP = 32  # columns per group in the grouped top-k (16 and 128 measured slower)


def check_row_max(row_max: torch.Tensor) -> None:
    """Stop on a NaN or +inf row maximum [B] (NaN propagates through a max; -inf is allowed: padding and
    excluded items)."""
    bad = torch.isnan(row_max) | torch.isposinf(row_max)
    if bad.any():
        rows = bad.nonzero().squeeze(1)[:5].tolist()
        raise NonFiniteScoresError(f"NaN or +inf scores for batch rows {rows}: recommendation stopped")


def _group_maxima(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Maxima [B, G] of the whole groups of GROUP columns of ``scores`` [B, N], the row maxima [B] (NaN
    propagates) and M, the columns in whole groups (the rest are always candidates)."""
    B, N = scores.shape
    M = N // GROUP * GROUP
    group_max = scores[:, :M].view(B, M // GROUP, GROUP).amax(dim=2)  # [B, G]
    if M == 0:
        return group_max, scores.amax(dim=1), M
    row_max = group_max.amax(dim=1)
    if M < N:
        row_max = torch.maximum(row_max, scores[:, M:].amax(dim=1))
    return group_max, row_max, M


def _group_columns(groups: torch.Tensor, M: int, N: int) -> torch.Tensor:
    """The columns [B, g x GROUP (+ N - M)] of the groups ``groups`` [B, g], then the columns past M."""
    B = len(groups)
    cols = (groups[:, :, None] * GROUP + torch.arange(GROUP, device=groups.device)).view(B, -1)
    if M < N:
        cols = torch.cat([cols, torch.arange(M, N, device=groups.device).expand(B, -1)], dim=1)
    return cols


def top_k_columns(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` best entries of each row of ``scores`` [B, N]: values [B, k], columns [B, k] (in no order) and
    the row maxima [B] (NaN where a row holds one).

    Grouped, exact: each row's k best entries lie in its k groups with the highest maxima (an entry outside
    them has k group maxima, k distinct entries, at least as high). ~1.6x faster than a top-k over all N
    columns. With ties at the k-th value, which tied entry is returned is arbitrary, as with `torch.topk`.
    """
    B, N = scores.shape
    if 2 * k >= N // GROUP:  # few groups: nothing to gain
        values, cols = scores.topk(min(k, N), dim=1, sorted=False)
        return values, cols, scores.amax(dim=1)
    group_max, row_max, M = _group_maxima(scores)
    cols = _group_columns(group_max.topk(k, dim=1, sorted=False).indices, M, N)  # [B, k*GROUP (+ rest)]
    values, pick = scores.gather(1, cols).topk(k, dim=1, sorted=False)  # [B, k]
    return values, cols.gather(1, pick), row_max


def best_first(values: torch.Tensor, cols: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``values`` / ``cols`` [B, k] (any order) as arrays sorted best first, equal scores by lower column."""
    values, cols = values.cpu().numpy(), cols.cpu().numpy()
    order = np.lexsort((cols, -values), axis=1)
    return np.take_along_axis(values, order, 1), np.take_along_axis(cols, order, 1)


@dataclass(frozen=True)
class Exclusions:
    """Columns to leave out per row, as one flat array: row r's are ``flat[start[r]:stop[r]]``."""

    flat: np.ndarray  # int64 [E]
    start: np.ndarray  # int64 [R]
    stop: np.ndarray  # int64 [R]

    @classmethod
    def of(cls, rows: Sequence[np.ndarray]) -> Exclusions:
        """One row per array of ``rows`` (e.g. each user's whole sequence of item indices)."""
        packed = PackedSequences.of(rows)
        return cls(packed.flat, packed.starts, packed.starts + packed.lengths)

    def take(self, rows: np.ndarray) -> Exclusions:
        """The exclusions of ``rows``, in that order (the flat array is shared, not copied)."""
        return Exclusions(self.flat, self.start[rows], self.stop[rows])

    def positions(self, width: int) -> np.ndarray:
        """The listed entries as flat positions in a C-ordered [R, width] block (int64 [E']).

        Raises:
            ValueError: a listed column is outside 0..width-1.
        """
        counts = self.stop - self.start
        cols = self.flat[np.repeat(self.stop - np.cumsum(counts), counts) + np.arange(int(counts.sum()))
                         ] if len(counts) else np.zeros(0, np.int64)
        if len(cols) and (cols.min() < 0 or cols.max() >= width):
            raise ValueError(f"excluded columns outside 0..{width - 1}")
        return np.repeat(np.arange(len(counts), dtype=np.int64) * width, counts) + cols


def top_k(scores: torch.Tensor, k: int, exclude: Exclusions | None = None, compiled: bool | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of float32 ``scores`` [B, N+1] (excluded items at -inf): scores
    [B, k] and columns [B, k], best first, equal scores by lower column (item index). The columns
    ``exclude`` lists per row are set to -inf first, in place.

    ``compiled``: the compiled per-row pass (`cammsr.evaluate.row_select`; CPU only) or the torch one (any
    device: a top-k over the group maxima, then over the chosen groups); default: compiled on the CPU. They
    differ only in which of several entries tied at the k-th value is kept (compiled: the lower column).

    Raises:
        NonFiniteScoresError: a row holds NaN or +inf (-inf is allowed: padding and excluded items).
    """
    k = min(k, scores.shape[1])
    if compiled is None:
        compiled = scores.device.type == "cpu"
    if not compiled:
        scores = scores.contiguous()
        if exclude is not None:
            where = torch.from_numpy(exclude.positions(scores.shape[1])).to(scores.device)
            scores.view(-1).index_fill_(0, where, float("-inf"))
        values, cols, row_max = top_k_columns(scores, k)
        check_row_max(row_max)
        return best_first(values, cols)
    if scores.device.type != "cpu":
        raise ValueError(f"compiled top-k: CPU scores only, found {scores.device}")
    # numba (llvmlite) costs ~160 MB of resident memory once imported: only a process that recommends pays it
    from cammsr.evaluate.row_select import exclude_columns, top_k_from_groups

    scores = scores.float().contiguous()
    if exclude is not None:
        exclude_columns(scores.numpy(), exclude.flat, exclude.start, exclude.stop)
    group_max, row_max, _ = _group_maxima(scores)
    check_row_max(row_max)
    return top_k_from_groups(scores.numpy(), group_max.numpy(), GROUP, k)
