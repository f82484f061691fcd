"""cammsr/batches.py: length-bucketed training batches, by sequences or by targets."""

import numpy as np
import torch

from cammsr.data.batches import bucketed_batches


def draw(lengths, **kw) -> list[np.ndarray]:
    return list(bucketed_batches(np.asarray(lengths), generator=torch.Generator().manual_seed(0), **kw))


def test_sequence_batches_cover_every_sequence_once_with_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 1000)
    batches = draw(lengths, batch_size=10, bucket_batches=100)  # one window: sorted, then cut
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(len(b) == 10 for b in batches)
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 3  # bucketed: members of a batch have about the same length (random: ~44)


def test_target_budget_batches_fill_up_to_the_budget_and_keep_long_sequences_alone():
    lengths = np.array([3, 3, 3, 3, 7, 12, 1, 1, 2, 2, 5, 4])
    batches = draw(lengths, batch_size=999, bucket_batches=100, max_targets=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert lengths[b].sum() <= 8 or len(b) == 1  # the 12-target sequence is a batch of its own
    # greedy filling of the sorted window: no two neighbouring batches could have been merged
    sizes = sorted(int(lengths[b].sum()) for b in batches)
    assert sum(sizes) == lengths.sum() and len(batches) <= 8


def test_target_budget_gives_about_the_budget_per_step_on_skewed_lengths():
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.geometric(0.15, 5000) + 2, 50)  # mostly short, a long tail
    batches = draw(lengths, batch_size=1, bucket_batches=32, max_targets=512)
    totals = np.array([lengths[b].sum() for b in batches])
    assert totals.max() <= 512 and np.median(totals) > 450  # by sequences, totals would vary ~15x
