"""Ranking under both history-masking protocols from one scoring pass equals two separate passes."""

import numpy as np
import torch

from cammsr.evaluate.ranking import rank_targets, rank_targets_by_protocol


def test_both_protocols_in_one_pass_equal_separate_passes():
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.standard_normal((21, 4)).astype(np.float32))
    calls = []

    def score(seq, lengths):
        calls.append(len(seq))
        return table[seq[torch.arange(len(seq)), lengths - 1]] @ table.T  # [B, 21]

    histories = [rng.integers(1, 21, rng.integers(1, 6)) for _ in range(37)]
    targets = np.array([h[-1] if i % 3 == 0 else rng.integers(1, 21) for i, h in enumerate(histories)])
    both = rank_targets_by_protocol(score, histories, targets, batch_size=8)
    assert sum(calls) == 37  # every user scored once
    for mask in (False, True):
        assert np.array_equal(both[mask], rank_targets(score, histories, targets, 8, mask))
    assert (both[True] <= both[False]).all() and (both[True] < both[False]).any()  # masking only lifts
