"""cammsr/evaluate/exact_bf16.py: ranks from the bfloat16 matmul plus the exact recheck equal exact ranks.

Two kinds of data. Random float32 vectors, where float32 ranks are exact (no neighbour lies within float32
rounding of a target: checked, not assumed), so the ranker must equal `target_ranks` on float32 scores.
And integer vectors, where every score is an integer below 2^24 (exact in float32 and float64), so exact
ties and neighbours one unit away from the target (a relative gap of ~1e-5, well inside the bfloat16
rounding bound) can be built on purpose; a plain bfloat16 matmul gets those ranks wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cammsr.core.device import cpu_bf16_units
from cammsr.evaluate import exact_bf16
from cammsr.evaluate.exact_bf16 import ExactBF16Ranker, NonFiniteVectorsError, classify, split_bf16
from cammsr.evaluate.metrics import NonFiniteScoresError, target_ranks
from cammsr.evaluate.ranking import FactoredScores, rank_targets_by_protocol


def f32_ranks(h: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    scores = h @ items.T  # [B, N+1]
    scores[:, 0] = float("-inf")
    return target_ranks(scores, targets)


def exact_ranks(h: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ranks from float64 scores (exact for the integer data below)."""
    s = h.double() @ items.double().T  # [B, N+1]
    s[:, 0] = float("-inf")
    c = s.gather(1, targets[:, None])
    return (s >= c).sum(1) - 1


def integer_case(seed: int, n: int = 600, b: int = 200, d: int = 64):
    """Integer vectors with exact ties and +-1 neighbours of every target."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(-64, 65, (n + 1, d), generator=g).float()
    items[0] = 0
    h = torch.randint(-64, 65, (b, d), generator=g).float()
    h[:, 0] = 1.0  # moving an item by e_0 moves its score by exactly 1
    targets = torch.randint(1, n + 1, (b,), generator=g)
    # every user's target gets (up to) three twins and near-twins elsewhere in the table
    for u in range(b):
        t = int(targets[u])
        for j, step in zip(torch.randint(1, n + 1, (3,), generator=g).tolist(), (0.0, 1.0, -1.0), strict=True):
            if j != t and not (targets == j).any():  # do not move another user's target
                items[j] = items[t]
                items[j, 0] += step
    return h, items, targets


def test_split_bf16_keeps_16_bits():
    x = torch.randn(10_000, dtype=torch.float32) * torch.logspace(-20, 20, 10_000)
    hi, lo = split_bf16(x)
    assert hi.dtype == lo.dtype == torch.bfloat16
    residual = (x.double() - hi.double() - lo.double()).abs()
    assert (residual <= 2.0**-16 * x.double().abs()).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_vectors_rank_as_float32(seed):
    g = torch.Generator().manual_seed(seed)
    n, b, d = 3000, 257, 48  # 3d + 2 = 146 columns: padded to 160
    items = torch.randn(n + 1, d, generator=g) * torch.rand(n + 1, 1, generator=g) * 3
    h = torch.randn(b, d, generator=g) * 2
    targets = torch.randint(1, n + 1, (b,), generator=g)
    expected = f32_ranks(h, items, targets)
    assert torch.equal(expected, exact_ranks(h, items, targets))  # float32 decides no rank here
    got = ExactBF16Ranker(items).ranks(h, targets)[False]
    assert torch.equal(got, expected)
    assert got.min() >= 0 and got.max() > n // 2  # targets all over the ranking


@pytest.mark.parametrize("threads", [1, 2])
def test_row_blocks_on_threads_rank_as_one_block(threads, monkeypatch):
    h, items, targets = integer_case(3, n=500, b=700)  # near ties everywhere: many pairs to recheck per block
    expected = exact_ranks(h, items, targets)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        monkeypatch.setattr(exact_bf16, "ROW_BLOCK", 64)  # 11 blocks, the last one short
        got = ExactBF16Ranker(items).ranks(h, targets)[False]
        assert torch.get_num_threads() == threads  # the workers' one-thread setting stayed theirs
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, expected)


def test_blocks_one_after_another_classify_as_blocks_per_thread(monkeypatch):
    h, items, targets = integer_case(4, n=300, b=500)
    ranker = ExactBF16Ranker(items)
    lhs = torch.cat([split_bf16(h)[0]] * 3 + [torch.zeros(len(h), ranker.width - 3 * h.shape[1], dtype=torch.bfloat16)],
                    dim=1)
    tau = torch.full((len(h),), 0.5).bfloat16().view(torch.int16)
    monkeypatch.setattr(exact_bf16, "ROW_BLOCK", 64)
    threaded = ranker._score_and_classify(lhs, tau, targets, per_thread=True)
    serial = ranker._score_and_classify(lhs, tau, targets, per_thread=False)  # what a GPU runs: 2^28 // 301 rows
    assert torch.equal(threaded[0], serial[0]) and len(threaded[1]) > 0
    pairs = sorted(zip(threaded[1].tolist(), threaded[2].tolist(), strict=True))
    assert pairs == sorted(zip(serial[1].tolist(), serial[2].tolist(), strict=True))
    out = lhs.float() @ ranker.table.float().T  # integers: exact in both, so the same bfloat16 scores
    out[:, 0] = float("-inf")
    out[torch.arange(len(h)), targets] = float("-inf")
    assert torch.equal(threaded[0], classify(out.bfloat16(), tau)[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_ties_and_near_ties(seed):
    h, items, targets = integer_case(seed)
    expected = exact_ranks(h, items, targets)
    assert torch.equal(expected, f32_ranks(h, items, targets))  # integers < 2^24: float32 is exact too
    got = ExactBF16Ranker(items).ranks(h, targets)[False]
    assert torch.equal(got, expected)
    # the data is hard: a plain bfloat16 score matmul ranks some of these targets wrong
    naive = h.bfloat16() @ items.bfloat16().T
    naive[:, 0] = float("-inf")
    assert not torch.equal(target_ranks(naive.float(), targets), expected)


@pytest.mark.parametrize("multiple", [32, 4, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_near_ties_at_the_size_of_the_rounding_bound(seed, multiple, monkeypatch):
    """Twins of each target moved by 1e-8..1e-3 of its length: many land inside the bfloat16 bound, some
    inside the hi/lo split's own error, so a bound that were too small would certify wrong signs. The same
    ranks whatever the matmul's depth is padded to (AMX CPUs, other CPUs, none)."""
    monkeypatch.setattr(exact_bf16, "width_multiple", lambda device: multiple)
    g = torch.Generator().manual_seed(seed)
    n, b, d = 800, 200, 48
    items = torch.randn(n + 1, d, generator=g)
    h = torch.randn(b, d, generator=g)
    targets = torch.randperm(n, generator=g)[:b] + 1  # distinct targets
    free = [i for i in range(1, n + 1) if i not in set(targets.tolist())]
    eps = torch.logspace(-8, -3, 6)
    k = 0
    for u in range(b):
        t = int(targets[u])
        for e in eps[torch.randperm(len(eps), generator=g)[:3]]:
            items[free[k % len(free)]] = items[t] + e * items[t].norm() * torch.randn(d, generator=g)
            k += 1
    s = (h.double()[:, None, :] * items.double()[None]).sum(-1)  # [B, N+1] exact products, float64 sums
    s[:, 0] = float("-inf")
    expected = (s >= s.gather(1, targets[:, None])).sum(1) - 1
    ranker = ExactBF16Ranker(items)
    assert ranker.width % multiple == 0 and ranker.width - 3 * d - 2 < multiple
    assert torch.equal(ranker.ranks(h, targets)[False], expected)


def test_width_multiple_pads_for_amx_tiles_only_where_the_cpu_has_them():
    amx = cpu_bf16_units() == "amx"
    assert exact_bf16.width_multiple(torch.device("cpu")) == (32 if amx else 4)
    assert exact_bf16.width_multiple(torch.device("meta")) == 32


def test_ties_count_against_the_target():
    items = torch.tensor([[0.0, 0.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 0.0], [0.0, -1.0]])
    h = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # scores: -inf, 3, 3, 3, 3, -1
    got = ExactBF16Ranker(items).ranks(h, torch.tensor([2, 5]))[False]
    assert got.tolist() == [3, 4]  # item 2 ties with 1, 3 and 4 (as target_ranks counts); item 5 is last


def test_history_masking_under_both_protocols_matches_float32():
    h, items, targets = integer_case(3, n=400, b=150)
    g = torch.Generator().manual_seed(3)
    histories = []
    for u in range(len(h)):
        hist = torch.randint(1, 401, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        if u % 4 == 0:
            hist[-1] = targets[u]  # a repeat purchase: the target stays ranked
        if u % 5 == 0:
            hist = torch.cat([hist, hist[:3]])  # repeated history items
        histories.append(hist.numpy())
    scorer = FactoredScores(lambda seq, lengths: h[seq[:, 0] - 1], items)  # user u's vector from its first item
    for u, hist in enumerate(histories):
        hist[0] = u + 1  # the first item names the user; items 1..150 are real items too
    t = targets.numpy()
    f32 = rank_targets_by_protocol(scorer, histories, t, batch_size=64, precision=torch.float32)
    bf16 = rank_targets_by_protocol(scorer, histories, t, batch_size=64, precision=torch.bfloat16)
    for mask in (False, True):
        assert np.array_equal(bf16[mask], f32[mask]), mask
    assert (f32[True] < f32[False]).sum() > 20  # masking moved many targets up
    # and the masked float32 ranks are right: by hand for a few users
    s = (h.double() @ items.double().T).numpy()
    for u in range(0, 150, 7):
        seen = set(histories[u].tolist()) - {int(t[u])}
        others = [i for i in range(1, 401) if i != t[u] and i not in seen]
        assert f32[True][u] == sum(s[u, i] >= s[u, t[u]] for i in others)


def test_non_finite_vectors_are_refused():
    items = torch.randn(10, 4)
    ranker = ExactBF16Ranker(items)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = items.clone()
        broken[3, 1] = bad
        with pytest.raises(NonFiniteVectorsError, match="item table"):
            ExactBF16Ranker(broken)
        h = torch.randn(5, 4)
        h[2, 0] = bad
        with pytest.raises(NonFiniteVectorsError, match="user vector"):
            ranker.ranks(h, torch.tensor([1, 2, 3, 4, 5]))
    assert issubclass(NonFiniteVectorsError, NonFiniteScoresError)  # what the float32 path raises


def test_a_nan_user_vector_stops_ranking_in_both_precisions():
    items = torch.randn(12, 4)
    scorer = FactoredScores(lambda seq, lengths: torch.full((len(seq), 4), float("nan")), items)
    hist = [np.array([1, 2]), np.array([3])]
    for precision in (torch.float32, torch.bfloat16):
        with pytest.raises(NonFiniteScoresError):
            rank_targets_by_protocol(scorer, hist, np.array([4, 5]), precision=precision)


def test_masked_ranks_need_the_histories():
    with pytest.raises(ValueError, match="histories"):
        ExactBF16Ranker(torch.randn(5, 3)).ranks(torch.randn(2, 3), torch.tensor([1, 2]), masks=(True,))


def test_classify_counts_above_and_lists_the_near_entries():
    out = torch.tensor([[0.5, -0.5, 0.01, -0.01, 2.0, float("-inf")],
                        [0.0, 1.0, 1.0, -3.0, 0.02, 0.03]]).bfloat16()
    tau = torch.tensor([0.1, 0.025]).bfloat16().view(torch.int16)
    above, rows, cols = classify(out, tau)
    assert above.tolist() == [2, 3]  # > tau: 0.5, 2.0 | 1.0, 1.0, 0.03
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 2), (0, 3), (1, 0), (1, 4)]
    # many rows (several blocks of 64) on several threads give the same answer as one
    big = torch.randn(300, 1000).bfloat16()
    taus = torch.full((300,), 0.01).bfloat16().view(torch.int16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = classify(big, taus)
        torch.set_num_threads(2)
        two = classify(big, taus)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0])
    bound = float(torch.tensor(0.01).bfloat16())
    assert torch.equal(one[0], (big.float() > bound).sum(1))
    pairs = sorted(zip(two[1].tolist(), two[2].tolist(), strict=True))
    assert pairs == sorted(map(tuple, (big.float().abs() <= bound).nonzero().tolist()))
    assert pairs == sorted(zip(one[1].tolist(), one[2].tolist(), strict=True)) and len(pairs) > 100


def test_classify_lists_every_near_entry_of_a_row_that_is_all_near():
    out = torch.zeros(3, 500).bfloat16()  # row 1: every entry near; rows 0 and 2: a few
    out[0] = 1.0
    out[0, [3, 77, 499]] = 0.0
    out[2] = -1.0
    out[2, 250] = 0.001
    tau = torch.tensor([0.01, 0.01, 0.01]).bfloat16().view(torch.int16)
    above, rows, cols = classify(out, tau)
    assert above.tolist() == [497, 0, 0]
    pairs = list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert pairs == [(0, 3), (0, 77), (0, 499), *((1, j) for j in range(500)), (2, 250)]


def crowded_top(seed: int, cap: int, b: int = 60, n: int = 3000, d: int = 48):
    """Per user a target far above the random items, ``cap`` - 10 .. ``cap`` - 3 items clearly above it (every
    third user: ``cap`` + 20) and 12 twins of it within 1e-6..1e-2 of its length (inside the first pass's bound,
    about half above it): true ranks straddle ``cap``, and an item the first pass wrongly certified would push
    one past it."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n + 1, d, generator=g)
    h = torch.randn(b, d, generator=g)
    order = (torch.randperm(n, generator=g) + 1).tolist()
    targets = torch.tensor(order[:b])
    free = iter(order[b:])
    for u in range(b):
        t = int(targets[u])
        items[t] = h[u] / h[u].norm() * 7.0  # scores ~7 ||h||, the random items' ~N(0, ||h||^2)
        for _ in range(cap + 20 if u % 3 == 2 else cap - 10 + int(torch.randint(0, 8, (1,), generator=g))):
            items[next(free)] = items[t] * 1.5
        for e in torch.logspace(-6, -2, 12):
            items[next(free)] = items[t] + e * 7.0 * torch.randn(d, generator=g) / d**0.5
    return h, items, targets


def float64_ranks(h: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                  histories: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Ranks from float64 sums of the exact products; with ``histories``, those items (but the target) left out."""
    s = (h.double()[:, None, :] * items.double()[None]).sum(-1)  # [B, N+1]
    s[:, 0] = float("-inf")
    c = s.gather(1, targets[:, None])
    for u, hist in enumerate(histories or []):
        s[u, hist[hist != targets[u]]] = float("-inf")
    return (s >= c).sum(1) - 1


@pytest.mark.parametrize("cap", [10, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_capped_ranks_are_exact_below_the_cap(seed, cap, monkeypatch):
    h, items, targets = crowded_top(seed, cap)
    g = torch.Generator().manual_seed(seed)
    # histories: some of the items above the target, some twins, some random items, repeats, the target itself
    histories = [torch.cat([torch.randint(1, len(items), (int(torch.randint(1, 9, (1,), generator=g)),),
                                          generator=g), targets[u : u + 1].repeat(u % 2)]) for u in range(len(h))]
    for u in range(0, len(h), 3):
        above = (items @ h[u] > items[targets[u]] @ h[u]).nonzero().squeeze(1)
        histories[u] = torch.cat([histories[u], above[:3], above[:1]])
    seq = torch.nn.utils.rnn.pad_sequence(histories, batch_first=True)  # [B, L], 0 = padding
    full = {False: float64_ranks(h, items, targets), True: float64_ranks(h, items, targets, histories)}
    assert ((full[False] > cap - 4) & (full[False] < cap)).sum() >= 5  # many just below the cap
    ranker = ExactBF16Ranker(items)
    ranked = []
    exact_ranks_of = ranker._exact_ranks
    monkeypatch.setattr(ranker, "_exact_ranks", lambda h, *a: ranked.append(len(h)) or exact_ranks_of(h, *a))
    got = ranker.ranks(h, targets, seq, (False, True), cap=cap)
    for mask in (False, True):
        assert torch.equal(got[mask], full[mask].clamp(max=cap)), mask
    assert 0 < ranked[0] < len(h)  # the first pass settled some users, not all
    assert torch.equal(ranker.ranks(h, targets, seq, (False, True), cap=10**6)[True], full[True])
    # the data is hard: a first pass that trusted its bfloat16 scores would settle users below the cap
    monkeypatch.setattr(ranker, "_coarse_rel", 0.0)
    assert not torch.equal(ranker.ranks(h, targets, seq, (False,), cap=cap)[False], full[False].clamp(max=cap))


def test_capped_first_pass_in_blocks_one_after_another_counts_as_per_thread(monkeypatch):
    h, items, targets = crowded_top(2, 20)
    ranker = ExactBF16Ranker(items)
    c = ranker.exact_scores(h.double(), torch.arange(len(h)), targets)
    monkeypatch.setattr(exact_bf16, "ROW_BLOCK", 16)  # 4 blocks, the last one short
    truth = float64_ranks(h, items, targets)
    # every item; then some items, among them the targets of half the users (left out of their counts)
    some = torch.cat([targets[::2], torch.arange(1, len(items), 7)]).unique()
    counts = {}
    for name, cols in (("all", None), ("some", some)):
        counts[name] = ranker._certified_above(h, c, targets, cols, per_thread=True)
        assert torch.equal(counts[name], ranker._certified_above(h, c, targets, cols, per_thread=False))  # a GPU's
    assert (counts["all"] <= truth).all() and (counts["all"] >= 10).all()  # a lower bound, and a useful one
    assert (counts["some"] <= counts["all"]).all() and (counts["some"] < counts["all"]).any()
    s = h.double() @ items.double().T  # items scoring clearly above the target (> 1% of it), among ``some``
    clearly = (s[:, some] > 1.01 * s.gather(1, targets[:, None])).sum(1)
    assert (counts["some"] >= clearly).all()
