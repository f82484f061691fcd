"""Exact ranks from a bfloat16 score matmul.

Full ranking needs, per user, the number of items that score at least as high as the target. The
scores are dot products, user vector h [D] times item vector t_i [D]. On a CPU with AMX the matmul
in bfloat16 is ~3x the float32 speed, but bfloat16 keeps 8 bits, so a plain bf16 score is off by up
to ~1% of ||h|| ||t_i||, far more than the gaps between neighbouring items. Two things make it exact:

1. **Each user's scores come out relative to its target's, at near-float32 accuracy.** h and the table
   are split into bfloat16 high and low parts (x = hi + lo + r, |r| <= 2^-16 |x|) and the matmul runs
   on ``[h_hi, h_lo, h_hi, -c_hi, -c_lo] . [t_hi, t_hi, t_lo, 1, 1]`` = h.t_i - c + O(2^-16), with c the
   target's score (float64). Its output, rounded to bfloat16, is therefore the *sign* of s_i - c
   wherever |s_i - c| exceeds a proven bound E (a few 1e-5 of ||h|| max||t||): rounding to nearest
   never flips a sign. The matmul is 3D + 2 deep; with AMX, at D = 64, it costs about what a D-deep
   one does (its output, not its depth, bounds it); with AVX512-BF16 alone the depth counts, and the
   bfloat16 pass (196 deep) runs at the CPU's bfloat16 peak, about the time of a float32 matmul 65
   deep, with half the bytes of output to classify.
2. **The items within E of the target are rechecked exactly**: their dot products in float64 (the
   products of float32 numbers are exact there), a handful per user.

3. **With a cap** (the metrics read ranks below max k only, as a top-k list does), a first pass 64 + 2 deep,
   ``[h_hi, -c_hi, -c_lo] . [t_hi, 1, 1]`` (about a third of the work), counts the items it certifies above
   the target (its bound is ~2^-7 of ||h|| max||t||, not ~2^-16). A user with at least ``cap`` of them
   (``cap`` + its history length when the history is masked) ranks at or past ``cap``; only the others
   go through 1 and 2. The first pass runs on the HEAD_ITEMS items that the users' mean vector scores highest
   before it runs on all items, for the users those did not settle: where scores share a popular head (on
   toys, 97% of the users after two epochs) it costs a twentieth of a pass over all items.

So the rank of every target is exactly what float32 (or real) arithmetic gives whenever its
neighbours are further than float32 rounding (~1e-7 relative) from it, and exact ties (identical
item vectors) count against the target as in `cammsr.evaluate.metrics.target_ranks`. Masked
history items are handled by subtracting the (exactly rechecked) history items that scored at least
the target.

The bound, for x split as above (u = 2^-8 the bfloat16 unit roundoff, K = 3D + 2 terms, float32
accumulation with gamma_K = K 2^-24 / (1 - K 2^-24)): the matmul's exact value differs from
h.t_i - c by at most 3.1 u^2 (A_i + |c|), with A_i = sum_k |h_k t_ik| <= ||h|| ||t_i||, and its
float32 accumulation adds gamma_K (1.1 A_i + 1.1 |c|); flush-to-zero adds at most K 2^-126. An output
o with |o| > E (1 + u) certifies the sign of s_i - c. The first pass's products h_hi t_hi differ from h t by
at most (2u + u^2) |h t|, so there the first term is (2u + 2u^2) (A_i + |c|).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cammsr.core.device import cpu_bf16_units
from cammsr.evaluate.metrics import NonFiniteScoresError

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_F32 = 2.0**-24
# users per block on the CPU: each thread scores a block ([256, N] bfloat16, 6 MB at N = 12k) and classifies it
# while it is still in its core's cache; classifying the whole [B, N] output after one matmul measured ~1.3x
# slower on toys (the output makes a round trip through the shared cache)
ROW_BLOCK = 256
HEAD_ITEMS = 512  # items a capped ranking's first pass scores before it scores all items (see the module's 3.)


class NonFiniteVectorsError(NonFiniteScoresError):
    """A user or item vector holds NaN or infinity: its scores cannot be ranked (a `NonFiniteScoresError`,
    as the float32 path raises on the scores they would give)."""


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x -> bfloat16 (hi, lo) with x = hi + lo + r, |r| <= 2^-16 |x| elementwise."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


class ExactBF16Ranker:
    """Ranks targets among all items from bfloat16 matmuls plus an exact recheck.

    Args:
        items: FloatTensor [N+1, D] the item vectors (row 0 = padding, never ranked).
    """

    def __init__(self, items: torch.Tensor) -> None:
        items = items.detach().float().contiguous()
        if not torch.isfinite(items).all():
            raise NonFiniteVectorsError("NaN or infinity in the item table: ranking stopped")
        self.items = items  # [N+1, D]
        self.items64 = items.double()
        hi, lo = split_bf16(items)
        ones = torch.ones(len(items), 2, dtype=torch.bfloat16, device=items.device)
        multiple = width_multiple(items.device)
        self.width = -(-(3 * items.shape[1] + 2) // multiple) * multiple  # zero columns up to it
        pad = torch.zeros(len(items), self.width - 3 * items.shape[1] - 2, dtype=torch.bfloat16, device=items.device)
        self.table = torch.cat([hi, hi, lo, ones, pad], dim=1)  # [N+1, K]
        # the CPU blocks multiply by a [K, N+1] copy: oneDNN reads it as it is instead of re-laying the [N+1, K]
        # transpose out for every block (measured 1.65 vs 2.4 ms per block of 256 users at N = 12k)
        self.table_t = self.table.T.contiguous() if items.device.type == "cpu" else self.table.T
        # the first pass of a capped ranking: [t_hi, 1, 1] (zero columns up to a multiple)
        self.coarse_width = -(-(items.shape[1] + 2) // multiple) * multiple
        pad = torch.zeros(len(items), self.coarse_width - items.shape[1] - 2, dtype=torch.bfloat16,
                          device=items.device)
        coarse = torch.cat([hi, ones, pad], dim=1)  # [N+1, K']
        self.coarse_t = coarse.T.contiguous() if items.device.type == "cpu" else coarse.T
        self.norm_max = float(items[1:].norm(dim=1).max()) if len(items) > 1 else 0.0
        self._rel, self._abs = _bound_terms(self.table.shape[1], 3.1 * U_BF16**2)
        self._coarse_rel, self._coarse_abs = _bound_terms(self.coarse_width, 2 * U_BF16 + 2 * U_BF16**2)

    def exact_scores(self, h64: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, chunk: int = 8192
                     ) -> torch.Tensor:
        """float64 scores of users ``rows`` (into h64 [B, D]) with items ``cols``: [P], ``chunk`` pairs at a time
        (gathering every pair's two float64 rows at once held ~200 MB for the histories of 19k users)."""
        if len(rows) <= chunk:
            return (h64[rows] * self.items64[cols]).sum(1)
        return torch.cat([(h64[rows[i : i + chunk]] * self.items64[cols[i : i + chunk]]).sum(1)
                          for i in range(0, len(rows), chunk)])

    def ranks(self, h: torch.Tensor, targets: torch.Tensor, histories: torch.Tensor | None = None,
              masks: tuple[bool, ...] = (False,), cap: int | None = None) -> dict[bool, torch.Tensor]:
        """0-based rank of each target (items scoring >= it, the target excluded), per masking choice.

        Args:
            h: FloatTensor [B, D] user vectors.
            targets: LongTensor [B] item index of each target (1..N).
            histories: LongTensor [B, L] each user's earlier items (0 = padding), for ``True`` in ``masks``:
                those items (but the target) leave the ranking.
            masks: which protocols to return (False = unmasked, True = history masked).
            cap: ranks at or past it come back as ``cap`` (min(rank, cap)), exact below it: metrics at
                k <= cap need no more, and most users are settled by a first pass a third as deep.

        Raises:
            NonFiniteVectorsError: a user vector is not finite.
        """
        h = h.detach().float().contiguous()
        if not torch.isfinite(h).all():
            raise NonFiniteVectorsError("NaN or infinity in a user vector: ranking stopped")
        if True in masks and histories is None:
            raise ValueError("masked ranks need the histories")
        h64 = h.double()
        c = self.exact_scores(h64, torch.arange(len(h), device=h.device), targets)  # [B] float64 target scores
        if cap is None:
            return self._exact_ranks(h, h64, c, targets, histories, masks)
        # a masked rank is at least the certified count less the history's positions
        room = (histories > 0).sum(dim=1) if True in masks else torch.zeros_like(targets)  # [B]
        bar = cap + room  # [B] certified items that settle a user
        need = torch.arange(len(h), device=h.device)  # [R] users not settled yet
        if len(self.items) - 1 > 2 * HEAD_ITEMS:  # the head first, then every item for the users it left
            head = (self.items[1:] @ h.mean(dim=0)).topk(HEAD_ITEMS).indices + 1  # [K] items
            need = need[self._certified_above(h, c, targets, head) < bar]
        need = need[self._certified_above(h[need], c[need], targets[need]) < bar[need]]
        result = {m: torch.full_like(targets, cap) for m in masks}
        if len(need):
            exact = self._exact_ranks(h[need], h64[need], c[need], targets[need],
                                      histories[need] if histories is not None else None, masks)
            for m in masks:
                result[m][need] = exact[m].clamp(max=cap)
        return result

    def _exact_ranks(self, h: torch.Tensor, h64: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                     histories: torch.Tensor | None, masks: tuple[bool, ...]) -> dict[bool, torch.Tensor]:
        """`ranks` without a cap, given the user vectors in float32 and float64 and the target scores ``c``."""
        B = len(h)
        c_hi, c_lo = split_bf16(-c.float())  # c's float32 rounding is folded into the bound below
        h_hi, h_lo = split_bf16(h)
        pad = h_hi.new_zeros(B, self.width - 3 * h.shape[1] - 2)
        lhs = torch.cat([h_hi, h_lo, h_hi, c_hi[:, None], c_lo[:, None], pad], dim=1)  # [B, K]
        tau = self._tau(h, c, self._rel, self._abs)
        above, r, i = self._score_and_classify(lhs, tau, targets)  # certified s_i > c per row; the near pairs
        hit = self.exact_scores(h64, r, i) >= c[r]
        ranks = above + torch.zeros(B, dtype=torch.int64, device=h.device).index_add_(0, r, hit.long())
        result = {False: ranks}
        if True in masks:
            result[True] = ranks - self._history_at_or_above(h64, c, targets, histories)
        return {m: result[m] for m in masks}

    def _tau(self, h: torch.Tensor, c: torch.Tensor, rel: float, abs_: float) -> torch.Tensor:
        """Per user, the int16 bits of the smallest bfloat16 above the bound E (1 + 2u): an output past it
        certifies the sign of s_i - c. E bounds |out_i (unrounded) - (s_i - c)| by ``rel`` (A_i + |c|) +
        ``abs_``, plus the float32 rounding of c in the c column."""
        a = h.norm(dim=1).double() * self.norm_max + c.abs()  # [B] >= A_i + |c|
        bound = (a * rel + abs_ + c.abs() * U_F32 * 1.01) * (1 + 2 * U_BF16)
        return _round_up_bf16(bound).view(torch.int16)  # [B]

    def _certified_above(self, h: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                         items: torch.Tensor | None = None, per_thread: bool | None = None) -> torch.Tensor:
        """Per user, how many items (of ``items`` [K], real item indices, when given) the first pass certifies
        to score above the target: [B] (<= its rank). ``per_thread`` as in `_score_and_classify`."""
        table_t, cols = self.coarse_t, targets  # cols: each row's target column in table_t (-1: none)
        if items is not None:
            table_t = table_t[:, items].contiguous()  # [K', K]
            where = torch.full((len(self.items),), -1, dtype=torch.int64, device=items.device)
            where[items] = torch.arange(len(items), device=items.device)
            cols = where[targets]
        rows_per_block = max(ROW_BLOCK, ROW_BLOCK * len(self.items) // max(table_t.shape[1], 1))
        c_hi, c_lo = split_bf16(-c.float())
        h_hi = h.to(torch.bfloat16)
        pad = h_hi.new_zeros(len(h), self.coarse_width - h.shape[1] - 2)
        lhs = torch.cat([h_hi, c_hi[:, None], c_lo[:, None], pad], dim=1)  # [B, K']
        tau = self._tau(h, c, self._coarse_rel, self._coarse_abs)
        if not (lhs.device.type == "cpu" if per_thread is None else per_thread):
            step = max(rows_per_block, 2**28 // max(table_t.shape[1], 1))
            counts = []
            for s in range(0, len(lhs), step):
                out = _scored(lhs[s : s + step], table_t, cols[s : s + step], padding=items is None)  # [b, N+1 or K]
                counts.append((out.view(torch.int16) > tau[s : s + step, None]).sum(dim=1))
            return torch.cat(counts) if counts else targets.new_zeros(0)

        def block(rows: slice) -> np.ndarray:
            out = _scored(lhs[rows], table_t, cols[rows], padding=items is None)  # [b, N+1 or K]
            return _count_above(out.view(torch.int16).numpy(), tau[rows].numpy()[:, None])

        parts = _over_row_blocks(block, len(lhs), rows_per_block, torch_threads=1)
        return torch.from_numpy(np.concatenate(parts)) if parts else targets.new_zeros(0)

    def _score_and_classify(self, lhs: torch.Tensor, tau: torch.Tensor, targets: torch.Tensor,
                            per_thread: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`classify` of ``lhs @ table.T`` (~ s_i - c, bfloat16 [B, N+1]) with the padding column and each row's
        target left out. ``per_thread`` (default: on the CPU): in blocks of ROW_BLOCK users, one per thread, each
        scored and classified while in cache; else one block of up to 2^28 scores after another."""
        if not (lhs.device.type == "cpu" if per_thread is None else per_thread):
            parts = []
            step = max(ROW_BLOCK, 2**28 // self.table.shape[0])
            for s in range(0, len(lhs), step):
                out = _scored(lhs[s : s + step], self.table.T, targets[s : s + step])  # [b, N+1]
                above, r, i = classify(out, tau[s : s + step])
                parts.append((above, r + s, i))
            if not parts:
                return tuple(lhs.new_zeros(0, dtype=torch.int64) for _ in range(3))
            return tuple(torch.cat(k) for k in zip(*parts, strict=True))

        def block(rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            out = _scored(lhs[rows], self.table_t, targets[rows])  # [b, N+1]
            above, r, i = _classify_rows(out.view(torch.int16).numpy(), tau[rows].numpy()[:, None])
            return above, r + rows.start, i

        above, r, i = _concat(_over_row_blocks(block, len(lhs), ROW_BLOCK, torch_threads=1))
        return torch.from_numpy(above), torch.from_numpy(r), torch.from_numpy(i)

    def _history_at_or_above(self, h64: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
                             histories: torch.Tensor) -> torch.Tensor:
        """Per user, the distinct history items (not the target, not padding) scoring >= the target: [B]."""
        seq = histories.sort(dim=1).values  # [B, L]
        keep = (seq > 0) & (seq != targets[:, None])
        keep[:, 1:] &= seq[:, 1:] != seq[:, :-1]  # each item once
        r, j = keep.nonzero(as_tuple=True)
        hit = self.exact_scores(h64, r, seq[r, j]) >= c[r]
        return torch.zeros(len(seq), dtype=torch.int64, device=seq.device).index_add_(0, r, hit.long())


def width_multiple(device: torch.device) -> int:
    """The matmul's depth is padded with zero columns to a multiple of this: 32 on CUDA and on a CPU with AMX,
    whose tiles take 32 bfloat16 per row (194 deep measured 1.4x slower than 224 there); 4 on other CPUs,
    where AVX512-BF16 multiplies pairs and every column costs its share (224 deep measured 1.15-1.2x slower
    than 196 on one)."""
    if device.type == "cpu" and cpu_bf16_units() != "amx":
        return 4
    return 32


def _bound_terms(depth: int, split_rel: float) -> tuple[float, float]:
    """(rel, abs) of a pass ``depth`` deep whose products differ from the exact ones by at most ``split_rel``
    (A_i + |c|): rel adds float32 accumulation, gamma_K (1.1 A_i + 1.1 |c|), with a margin for the float64
    parts; abs is the flush-to-zero of subnormal products."""
    gamma = depth * U_F32 / (1 - depth * U_F32)
    return (split_rel + 1.1 * gamma) * (1 + 1e-3), depth * 2.0**-126


def _count_above(o16: np.ndarray, t16: np.ndarray) -> np.ndarray:
    """Per int16 row of ``o16`` [b, N] (bfloat16 bits), the entries above the row's positive bound ``t16`` [b, 1]
    (compared as in `classify`): [b] int64."""
    return _mark_above(o16, t16)[1]


def _mark_above(o16: np.ndarray, t16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_count_above` and the bool rows it counted, padded to a multiple of 64 for the popcounts:
    ([b, W] bool, [b] int64)."""
    n, N = o16.shape
    hits = np.zeros((n, -(-N // 64) * 64), dtype=np.bool_)
    np.greater(o16, t16, out=hits[:, :N])
    return hits, np.bitwise_count(hits.view(np.uint64)).sum(axis=1, dtype=np.int64)


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """Positive float64 x -> the smallest bfloat16 >= x (rounding to nearest may round down)."""
    b = x.float().to(torch.bfloat16)
    return torch.where(b.double() < x, (b.view(torch.int16) + 1).view(torch.bfloat16), b)


def classify(out: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of bfloat16 ``out`` [B, N]: how many entries are > tau (the row's positive bfloat16 bound, as
    int16 bits [B]), and the (row, column) pairs with |entry| <= tau: ([B], [P], [P]).

    The entries are compared as int16 bits: a non-negative bfloat16 orders as its bits, a negative one
    has the sign bit set (a negative int16), and its magnitude is the bits without the sign. On the CPU
    this runs in numpy over blocks of rows on torch's thread count (numpy releases the GIL), counting
    a bool row 64 entries at a time (numpy's popcount); torch's int16 compares with a broadcast
    threshold and its ``nonzero`` measured 5-10x slower here. One compiled pass per row (numba) measured
    0.11-0.2 s faster per toys pass, but importing numba costs ~160 MB of resident memory in every
    training and evaluation process, so it is not used here.
    """
    if out.device.type != "cpu":
        o16 = out.view(torch.int16)
        near = (o16 & 0x7FFF).le(tau[:, None]).nonzero()
        return (o16 > tau[:, None]).sum(dim=1), near[:, 0], near[:, 1]
    o16, t16 = out.view(torch.int16).numpy(), tau.numpy()[:, None]

    def block(rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        above, r, c = _classify_rows(o16[rows], t16[rows])
        return above, r + rows.start, c

    above, r, c = _concat(_over_row_blocks(block, len(o16), 64))
    return torch.from_numpy(above), torch.from_numpy(r), torch.from_numpy(c)


def _classify_rows(o16: np.ndarray, t16: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`classify` of int16 rows ``o16`` [b, N] against thresholds ``t16`` [b, 1]: (above [b], rows [P], cols [P])."""
    N = o16.shape[1]
    hits, above = _mark_above(o16, t16)
    width = hits.shape[1]
    np.less_equal(np.bitwise_and(o16, np.int16(0x7FFF)), t16, out=hits[:, :N])
    # few are near: find the nonzero 64-bit words first, then the bytes inside them
    words = np.flatnonzero(hits.view(np.uint64))  # [w]
    pos = (words[:, None] * 8 + np.arange(8)).ravel()  # byte offsets in hits
    pos = pos[hits.reshape(-1)[pos]]
    return above, (pos // width).astype(np.int64), (pos % width).astype(np.int64)


def _scored(lhs: torch.Tensor, table_t: torch.Tensor, targets: torch.Tensor, padding: bool = True) -> torch.Tensor:
    """``lhs @ table_t`` (scores ~ s_i - c, [b, N+1], or [b, K] of some items) with the padding column
    (``padding``: column 0) and each row's own target (its column in ``targets`` [b], -1 = none among the
    columns) set to -inf (never counted)."""
    out = lhs @ table_t
    if padding:
        out[:, 0] = float("-inf")
    rows = torch.arange(len(out), device=out.device)
    if bool((targets < 0).any()):
        rows, targets = rows[targets >= 0], targets[targets >= 0]
    out[rows, targets] = float("-inf")
    return out


def _over_row_blocks(fn, n: int, step: int, torch_threads: int | None = None) -> list:
    """``fn(slice)`` over blocks of ``step`` of ``n`` rows, on torch's thread count of threads (numpy and torch
    release the GIL), results in row order. ``torch_threads``: the intra-op threads of torch calls inside
    ``fn`` on a worker (OpenMP's setting is per calling thread, so the caller's stays as it is)."""
    blocks = [slice(s, min(s + step, n)) for s in range(0, n, step)]
    threads = max(1, min(torch.get_num_threads(), len(blocks)))
    if threads == 1:
        return [fn(b) for b in blocks]
    return list(_workers(threads, torch_threads).map(fn, blocks))


@functools.cache
def _workers(threads: int, torch_threads: int | None) -> ThreadPoolExecutor:
    """A pool kept for the process: a new thread's first torch matmul sets up its OpenMP and oneDNN state
    (measured ~0.1 s), which a pool per call would pay on every batch of users."""
    init = None if torch_threads is None else (lambda: torch.set_num_threads(torch_threads))
    return ThreadPoolExecutor(threads, thread_name_prefix="exact-bf16", initializer=init)


os.register_at_fork(after_in_child=_workers.cache_clear)  # a forked child has none of the parent's threads


def _concat(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Blockwise results (above, rows, cols) joined in order."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate(k) for k in zip(*parts, strict=True))
