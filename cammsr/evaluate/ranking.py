"""Batched full ranking: score every item for every user, rank each held-out target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cammsr.core.malloc import release_free_memory
from cammsr.data.batches import PackedSequences
from cammsr.evaluate.exact_bf16 import ExactBF16Ranker
from cammsr.evaluate.metrics import target_ranks

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(seq LongTensor [B, L], lengths LongTensor [B]) -> scores FloatTensor [B, N+1]."""

PADDING_SLACK = 0.15  # a run of users encoded together pads at most this share of its tokens...
MIN_GROUP = 128  # ...unless it would hold fewer users than this
RANK_SPAN = 32768  # users whose vectors the exact ranker takes in one call


@dataclass(frozen=True)
class FactoredScores:
    """Scores that are dot products, user vectors times item vectors (every model here): the ranker can
    then score in bfloat16 and recheck exactly (`cammsr.evaluate.exact_bf16`). Callable as a `ScoreFn`.

    Attributes:
        users: (seq [B, L], lengths [B]) -> FloatTensor [B, D] user vectors.
        items: FloatTensor [N+1, D] item vectors (row 0 = padding, never ranked).
    """

    users: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    items: torch.Tensor

    def __call__(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        scores = self.users(seq, lengths) @ self.items.T  # [B, N+1]
        scores[:, 0] = float("-inf")
        return scores


def model_scores(model) -> FactoredScores:
    """A trained `cammsr.model.CAMMSR` (in eval mode) as `FactoredScores`: its item tables, and in eval mode
    every item's CAMoE output, are computed once for the whole ranking pass, not once per batch of users."""
    with torch.no_grad():
        tables = model.item_tables()
        refined = None if model.training else model.refined_tables(tables)
        items = model.score_table(tables, refined).float()  # [N+1, M*d]
    return FactoredScores(lambda seq, lengths: model.user_vectors(seq, lengths, tables, refined), items)


def rank_targets(score_fn: ScoreFn, histories: Sequence[np.ndarray], targets: np.ndarray,
                 batch_size: int = 1024, mask_history: bool = False,
                 device: torch.device | str = "cpu", precision: torch.dtype = torch.float32,
                 cap: int | None = None) -> np.ndarray:
    """0-based rank of each target among all N items (column 0, padding, never ranks).

    With ``mask_history`` the user's earlier items are removed from the ranking (scored -inf),
    except the target itself, so a repeat purchase can still be a hit.
    Users are scored in length order (less padding) and ranks returned in input order.
    ``precision`` bfloat16 (for `FactoredScores`) scores in bfloat16 and rechecks the items near each
    target exactly: the same ranks as float32 wherever float32 rounding does not decide them.
    ``cap``: ranks at or past it come back as ``cap`` (all that metrics at k <= cap read, as from a top-k list);
    the bfloat16 path then settles most users with a pass a third as deep.
    """
    return rank_targets_by_protocol(score_fn, histories, targets, batch_size, (mask_history,), device,
                                    precision, cap)[mask_history]


def rank_targets_by_protocol(score_fn: ScoreFn, histories: Sequence[np.ndarray], targets: np.ndarray,
                             batch_size: int = 1024, masks: Sequence[bool] = (False, True),
                             device: torch.device | str = "cpu", precision: torch.dtype = torch.float32,
                             cap: int | None = None) -> dict[bool, np.ndarray]:
    """`rank_targets` under each history-masking choice in ``masks``, scoring every user once."""
    packed = PackedSequences.of(histories)
    order = np.argsort(packed.lengths, kind="stable")
    ranks = {mask: np.empty(len(histories), dtype=np.int64) for mask in masks}
    if precision == torch.bfloat16 and isinstance(score_fn, FactoredScores):
        _rank_exactly(score_fn, packed, order, targets, batch_size, tuple(masks), device, ranks, cap)
    else:
        _rank_by_scores(score_fn, packed, order, targets, batch_size, masks, device, ranks)
        if cap is not None:
            for r in ranks.values():
                np.minimum(r, cap, out=r)
    release_free_memory()  # what the pass freed, so the next phase does not start from its high-water mark
    return ranks


def _rank_by_scores(score_fn: ScoreFn, packed: PackedSequences, order: np.ndarray, targets: np.ndarray,
                    batch_size: int, masks: Sequence[bool], device: torch.device | str,
                    ranks: dict[bool, np.ndarray]) -> None:
    """The float32 path of `rank_targets_by_protocol`, into ``ranks``: every item scored, ``batch_size`` users at
    a time, and each target's rank counted."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seq = packed.padded(idx).to(device)  # [B, L]
        tgt = torch.from_numpy(targets[idx]).to(device)  # [B]
        scores = score_by_length(score_fn, packed, idx, packed.lengths, device).float()  # [B, N+1]
        scores[:, 0] = float("-inf")
        for mask in sorted(masks):  # unmasked first: masking writes into the scores
            if mask:
                keep = scores.gather(1, tgt[:, None])
                scores.scatter_(1, seq, float("-inf"))
                scores.scatter_(1, tgt[:, None], keep)
            ranks[mask][idx] = target_ranks(scores, tgt).cpu().numpy()


def _rank_exactly(score_fn: FactoredScores, packed: PackedSequences, order: np.ndarray, targets: np.ndarray,
                  batch_size: int, masks: tuple[bool, ...], device: torch.device | str,
                  ranks: dict[bool, np.ndarray], cap: int | None = None) -> None:
    """The bfloat16 + exact recheck path of `rank_targets_by_protocol`, into ``ranks``: the user vectors of up to
    RANK_SPAN users (``batch_size`` at a time), then their ranks in one call. Alternating the encoder and the
    ranker batch by batch measured ~1.4x slower on toys (each hands the cores to the other 19 times)."""
    exact = ExactBF16Ranker(score_fn.items.to(device))
    for users in spans(order, batch_size):
        h = user_vectors(score_fn.users, packed, users, batch_size, device)  # [U, D]
        tgt = torch.from_numpy(targets[users]).to(device)  # [U]
        seq = packed.padded(users).to(device) if True in masks else None  # [U, L]
        for mask, r in exact.ranks(h, tgt, seq, masks, cap).items():
            ranks[mask][users] = r.cpu().numpy()


def spans(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``order`` cut into spans of up to RANK_SPAN users (a whole number of batches): the users whose vectors are
    computed before any of them is ranked, so the encoder and the ranker do not take turns batch by batch."""
    span = max(batch_size, RANK_SPAN // batch_size * batch_size)
    return [order[s : s + span] for s in range(0, len(order), span)]


def user_vectors(users: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], packed: PackedSequences,
                 idx: np.ndarray, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """``users`` (a `FactoredScores.users`) of the length-sorted sequences ``idx`` of ``packed``, ``batch_size`` at a
    time in runs of similar length (`score_by_length`): [len(idx), D]."""
    parts = [score_by_length(users, packed, idx[i : i + batch_size], packed.lengths, device)
             for i in range(0, len(idx), batch_size)]
    if not parts:
        raise ValueError("user_vectors: no users")
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def score_by_length(fn: ScoreFn, histories: Sequence[np.ndarray] | PackedSequences, idx: np.ndarray,
                    lengths: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``fn`` over the users ``idx`` (length-sorted) in runs of similar length, concatenated in order.

    One batch of 1024 users spans lengths 15 to 50 at the long end of a catalog: padding them all to 50
    made 18% of toys' encoded positions padding. A run ends where its padding would pass PADDING_SLACK
    of its tokens (runs keep at least MIN_GROUP users, so the matmuls stay large).
    """
    packed = histories if isinstance(histories, PackedSequences) else PackedSequences.of(histories)
    out = []
    for start, end in length_runs(lengths[idx]):
        run = idx[start:end]
        out.append(fn(packed.padded(run).to(device), torch.from_numpy(lengths[run]).to(device)))
    return out[0] if len(out) == 1 else torch.cat(out)


def length_runs(lengths: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive ``lengths`` (ascending) to encode together: a run takes users while it
    has fewer than MIN_GROUP, then stops before the first user whose length would make its padding (run size x
    that length, against its tokens) pass PADDING_SLACK. Walks runs of equal length, not users: one more user
    of the run's own longest length never adds padding, so only the first of each length can end a run."""
    n = len(lengths)
    if n == 0:
        return []
    bounds = np.flatnonzero(np.diff(lengths)) + 1
    runs, start, total = [], 0, 0
    for s, e in zip(np.concatenate([[0], bounds]).tolist(), np.concatenate([bounds, [n]]).tolist(), strict=True):
        length = int(lengths[s])
        while s < e:
            size = s - start
            if size < MIN_GROUP:
                take = min(e - s, MIN_GROUP - size)
            elif length * (size + 1) > (1 + PADDING_SLACK) * (total + length):
                runs.append((start, s))
                start, total = s, 0
                continue
            else:
                take = e - s
            total += length * take
            s += take
    if start < n:
        runs.append((start, n))
    return runs


def popularity_scorer(train_seqs: Sequence[np.ndarray], num_items: int) -> ScoreFn:
    """Most-popular baseline: an item's score is its count in the training parts of the sequences."""
    counts = np.bincount(np.concatenate(list(train_seqs)) if train_seqs else np.zeros(0, np.int64),
                         minlength=num_items + 1).astype(np.float32)
    table = torch.from_numpy(counts)  # [N+1]

    def score(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return table.to(seq.device).expand(len(seq), -1).clone()

    return score
