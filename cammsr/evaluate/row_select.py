"""Recommend's exact top-k per row of a float32 score block from its group maxima, compiled (numba), on the CPU.

`cammsr.evaluate.top_k` takes the maxima of groups of GROUP columns (one vectorised pass). A row's k best
entries lie in the groups whose maximum is at least the k-th largest group maximum g_k: k distinct groups, so
k distinct entries, reach g_k, and an entry below it cannot be among the k best. Here, per row and in parallel
over rows, g_k is found among the G maxima, then only the groups that reach it (about k of them) and the
columns past the last whole group are read, each entry compared with the current k-th best and the few that
beat it inserted into a sorted list of k. This replaces two `torch.topk` calls, a gather of k x GROUP
candidates and a sort of the result with one pass over ~k x GROUP entries while they are in cache.

Exact, best first, ties broken by the lower column (an entry equal to the k-th best does not displace it).
The scores must be finite or -inf (excluded items): the caller checks the row maxima first.

`exclude_columns` sets each user's seen items to -inf from one flat array of all sequences (a padded index
tensor and a ``scatter_`` per block cost as much as the selection itself on toys).
"""

from __future__ import annotations

import numba
import numpy as np
import torch


def _match_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as torch (``project.num_threads``), not on every core."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@numba.njit(parallel=True, nogil=True, cache=True)
def _top_k_from_groups(scores: np.ndarray, group_max: np.ndarray, group: int, k: int,
                       values: np.ndarray, cols: np.ndarray) -> None:  # pragma: no cover - compiled
    B, N = scores.shape
    n_groups = group_max.shape[1]
    m = n_groups * group
    for b in numba.prange(B):
        # g_k: the k-th largest group maximum (-inf when there are no more than k groups: read them all)
        values[b, :] = -np.inf  # first the k largest group maxima, then the k best entries
        if n_groups > k:
            for g in range(n_groups):
                x = group_max[b, g]
                if x > values[b, k - 1]:
                    p = k - 1
                    while p > 0 and values[b, p - 1] < x:
                        values[b, p] = values[b, p - 1]
                        p -= 1
                    values[b, p] = x
        g_k = values[b, k - 1]
        values[b, :] = -np.inf
        cols[b, :] = 0
        bar = values[b, k - 1]
        for g in range(n_groups + 1):
            if g < n_groups and not group_max[b, g] >= g_k:
                continue
            lo, hi = (g * group, g * group + group) if g < n_groups else (m, N)
            for j in range(lo, hi):
                x = scores[b, j]
                if x > bar:
                    p = k - 1
                    while p > 0 and values[b, p - 1] < x:  # equal scores stay ahead: lower columns first
                        values[b, p] = values[b, p - 1]
                        cols[b, p] = cols[b, p - 1]
                        p -= 1
                    values[b, p] = x
                    cols[b, p] = j
                    bar = values[b, k - 1]


@numba.njit(parallel=True, nogil=True, cache=True)
def _exclude(scores: np.ndarray, flat: np.ndarray, start: np.ndarray, stop: np.ndarray,
             outside: np.ndarray) -> None:  # pragma: no cover - compiled
    N = scores.shape[1]
    for b in numba.prange(scores.shape[0]):
        for j in range(start[b], stop[b]):
            col = flat[j]
            if 0 <= col < N:
                scores[b, col] = -np.inf
            else:
                outside[b] = True


def exclude_columns(scores: np.ndarray, flat: np.ndarray, start: np.ndarray, stop: np.ndarray) -> None:
    """Set the columns ``flat[start[b]:stop[b]]`` of row b of ``scores`` [B, N] (a user's seen items) to -inf,
    in place.

    Raises:
        ValueError: a listed column is outside 0..N-1.
    """
    if len(start) != len(scores) or len(stop) != len(scores):
        raise ValueError(f"exclusions: expected {len(scores)} rows, found {len(start)} / {len(stop)}")
    if not scores.flags.c_contiguous or scores.dtype != np.float32:
        raise ValueError("scores: expected a C-contiguous float32 array")
    outside = np.zeros(len(scores), np.bool_)
    _match_torch_threads()
    _exclude(scores, flat, start, stop, outside)
    if outside.any():
        rows = np.flatnonzero(outside)[:5].tolist()
        raise ValueError(f"excluded columns outside 0..{scores.shape[1] - 1} in rows {rows}")


def top_k_from_groups(scores: np.ndarray, group_max: np.ndarray, group: int, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of float32 ``scores`` [B, N] (finite or -inf), given the maxima
    ``group_max`` [B, N // group] of its whole groups of ``group`` columns: values [B, k] float32 and
    columns [B, k] int64, best first, equal scores by lower column; past a row's last entry above -inf, -inf
    and column 0."""
    B, N = scores.shape
    if scores.dtype != np.float32 or group_max.dtype != np.float32:
        raise ValueError("scores and group_max: expected float32")
    if group_max.shape != (B, N // group):
        raise ValueError(f"group_max: expected shape {(B, N // group)}, found {group_max.shape}")
    values = np.empty((B, k), np.float32)
    cols = np.empty((B, k), np.int64)
    if k > 0 and B > 0:
        _match_torch_threads()
        _top_k_from_groups(np.ascontiguousarray(scores), np.ascontiguousarray(group_max), group, k, values, cols)
    return values, cols


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels on a tiny block, so that a timed loop does not
    include it (~3 s the first time after installing, then well under a second)."""
    scores = np.zeros((1, 40), np.float32)
    exclude_columns(scores, np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.int64))
    top_k_from_groups(scores, np.zeros((1, 1), np.float32), 32, 1)
