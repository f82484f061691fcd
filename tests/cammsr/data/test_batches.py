"""cammsr/batches.py: length-bucketed training batches, by sequences or by targets."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cammsr.data.batches import PackedSequences, bucketed_batches, pad_right


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


def test_windows_train_every_target_once_with_at_least_half_a_window_of_history():
    from cammsr.data.batches import training_pairs

    for n in (2, 30, 51, 52, 60, 76, 101, 333):
        seq = np.arange(1, n + 1)  # item k is followed by k + 1: a target's value names its position
        inputs, targets = training_pairs([seq], max_len=50)
        scored = np.concatenate([t[t > 0] for t in targets])
        assert sorted(scored.tolist()) == list(range(2, n + 1)), n  # every target once
        for x, t in zip(inputs, targets, strict=True):
            assert len(x) == len(t) <= 50
            for p in np.flatnonzero(t):
                assert np.array_equal(x[: p + 1], np.arange(t[p] - p - 1, t[p]))  # the true history
                assert p + 1 >= 25 or x[0] == 1  # half a window of history, or all there is
    inputs, targets = training_pairs([np.arange(1, 101)], max_len=50, windows=False)
    assert len(inputs) == 1 and targets[0].tolist() == list(range(51, 101))  # newest window only


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(1, 10**6), max_size=12), min_size=1, max_size=40), st.data())
def test_packed_sequences_pad_as_pad_right(seqs, data):
    seqs = [np.array(s, dtype=np.int64) for s in seqs]
    rows = np.array(data.draw(st.lists(st.integers(0, len(seqs) - 1), max_size=60)), dtype=np.int64)
    length = data.draw(st.none() | st.integers(1, 15))
    packed = PackedSequences.of(seqs)
    assert torch.equal(packed.padded(rows, length), pad_right([seqs[i] for i in rows], length))
    assert packed.lengths.tolist() == [len(s) for s in seqs]
