"""Exact top-k of every row of a score matrix, without a full selection over each row.

`torch.topk` over a [1024, 12,000] float32 block costs as much here as the matmul that made it: it selects
over every column of every row. Only a sliver of each row can be among its k best, and a cheap bound
finds it:

1. **Groups.** The row's columns are dealt into G groups (column c in group c mod G, so that each
   group's maximum is an elementwise max of contiguous slices: one fast pass). Every score above the
   k-th largest group maximum theta lies in one of the k groups with the largest maxima (another group's
   maximum is at most theta), and the row's top k are all >= theta (k group maxima are).
2. **Candidates only.** The k best groups' columns (k x ``GROUP_SIZE`` of them) are gathered and selected
   exactly. When the (k+1)-th group maximum equals theta, a score equal to theta outside the chosen
   groups could win a tie by its lower column: that row is selected over all its columns instead.

Order: higher score first, equal scores by lower column (item index), as `numpy.lexsort` on the whole
row gives. Scores are compared as integers (the float's bits made monotone, the column in the low
half), so ties are broken in the same selection pass. -inf scores (excluded items) sort last; NaN is
not allowed (the caller checks).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

GROUP_SIZE = 16  # columns per group: ~k x 16 candidates per row
MIN_COLUMNS = 2048  # below this many columns a plain full-row selection is as fast
ROWS_PER_TASK = 64  # rows per thread-pool task


def top_k(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of ``scores`` [B, N] (float32, no NaN): (values [B, k], columns
    [B, k]) as numpy arrays, best first, equal scores by lower column. With fewer than k columns, k = N.

    On a GPU `torch.topk` selects there (only [B, k] comes back); a tie at the k-th place may then keep a
    higher column than the CPU path would.
    """
    B, N = scores.shape
    k = min(k, N)
    if scores.device.type != "cpu":
        values, cols = scores.topk(k, dim=1, sorted=False)  # [B, k]; ordered below
        values, cols = values.float().cpu().numpy(), cols.cpu().numpy()
        order = np.argsort(-order_keys(values, cols, N), axis=1, kind="stable")
        return np.take_along_axis(values, order, 1), np.take_along_axis(cols, order, 1)
    scores = scores.detach().float().contiguous()
    s = scores.numpy()
    values = np.empty((B, k), dtype=np.float32)
    cols = np.empty((B, k), dtype=np.int64)

    select = _top_k_full if N < MIN_COLUMNS or k >= N // GROUP_SIZE else _top_k_grouped

    def block(rows: slice) -> None:
        c = select(s[rows], k)  # [b, k]
        cols[rows] = c
        values[rows] = np.take_along_axis(s[rows], c, axis=1)

    blocks = [slice(i, min(i + ROWS_PER_TASK, B)) for i in range(0, B, ROWS_PER_TASK)]
    threads = max(1, min(torch.get_num_threads(), len(blocks)))
    if threads == 1:
        for b in blocks:
            block(b)
    else:
        with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL in these loops
            list(pool.map(block, blocks))
    return values, cols


def order_keys(values: np.ndarray, cols: np.ndarray, num_cols: int) -> np.ndarray:
    """int64 keys that order (value descending, column ascending) as the keys descend: the float32 bits
    made monotone in the high half (-0.0 counted as +0.0), ``num_cols - 1 - col`` in the low half."""
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.int32)  # -0.0 + 0.0 = +0.0
    monotone = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # negative floats: lower 31 bits flipped
    return (monotone.astype(np.int64) << 32) | (num_cols - 1 - cols).astype(np.int64)


def _select(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions [b, k] of each row's k largest ``keys`` [b, C], largest first."""
    C = keys.shape[1]
    part = np.argpartition(keys, C - k, axis=1)[:, C - k:] if k < C else np.broadcast_to(np.arange(C), keys.shape)
    order = np.argsort(-np.take_along_axis(keys, part, axis=1), axis=1, kind="stable")  # keys are distinct
    return np.take_along_axis(part, order, axis=1)


def _top_k_full(s: np.ndarray, k: int) -> np.ndarray:
    """Columns [b, k] of the k best of each row of ``s`` [b, N], over every column."""
    N = s.shape[1]
    keys = order_keys(s, np.broadcast_to(np.arange(N), s.shape), N)
    return _select(keys, k)


def _top_k_grouped(s: np.ndarray, k: int) -> np.ndarray:
    """As `_top_k_full`, over the k best column groups of each row (module docstring)."""
    b, N = s.shape
    G = N // GROUP_SIZE  # groups; the last N - G * GROUP_SIZE columns are always candidates
    main = s[:, :G * GROUP_SIZE].reshape(b, GROUP_SIZE, G)  # [b, W, G] a view: column w * G + g
    group_max = torch.from_numpy(main).amax(dim=1).numpy()  # [b, G]
    chosen = np.argpartition(group_max, G - k - 1, axis=1)[:, G - k - 1:]  # [b, k+1] the k+1 largest maxima
    maxima = np.take_along_axis(group_max, chosen, axis=1)
    order = np.argsort(maxima, axis=1)  # ascending: column 0 holds the (k+1)-th largest
    chosen, maxima = np.take_along_axis(chosen, order, axis=1), np.take_along_axis(maxima, order, axis=1)
    tied = maxima[:, 0] == maxima[:, 1]  # a group outside the k best reaches theta: ties need every column
    groups = chosen[:, 1:]  # [b, k]
    cols = (np.arange(GROUP_SIZE)[None, :, None] * G + groups[:, None, :]).reshape(b, -1)  # [b, W*k]
    tail = np.broadcast_to(np.arange(G * GROUP_SIZE, N), (b, N - G * GROUP_SIZE))
    cols = np.concatenate([cols, tail], axis=1)  # [b, C]
    keys = order_keys(np.take_along_axis(s, cols, axis=1), cols, N)
    best = np.take_along_axis(cols, _select(keys, k), axis=1)  # [b, k]
    if tied.any():
        best[tied] = _top_k_full(s[tied], k)
    return best
