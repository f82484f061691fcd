"""Property tests of the k-core filter and the leave-one-out split on random catalogs: they never crash, the
k-core is the largest subset where the thresholds hold, and no held-out interaction reaches training."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cammsr.core.config import SplitParams
from cammsr.core.paths import CatalogPaths
from cammsr.data.kcore import kcore
from cammsr.data.splits import SplitError, load_splits, run_split

PROFILE = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])

interactions = st.lists(st.tuples(st.integers(0, 11), st.integers(0, 9), st.integers(0, 6)), max_size=120)


def frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame({"user_id": [f"u{u}" for u, _, _ in rows], "item_id": [f"i{i}" for _, i, _ in rows],
                         "timestamp": [1_400_000_000 + 86400 * t for _, _, t in rows]},
                        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64})


def naive_core(rows: list[tuple[str, str]], uc: int, ic: int) -> list[tuple[str, str]]:
    """The k-core by its definition: drop what falls short until nothing does."""
    while True:
        users, items = Counter(u for u, _ in rows), Counter(i for _, i in rows)
        kept = [(u, i) for u, i in rows if users[u] >= uc and items[i] >= ic]
        if len(kept) == len(rows):
            return kept
        rows = kept


@PROFILE
@given(interactions, st.integers(1, 4), st.integers(1, 4))
def test_kcore_is_the_fixpoint_and_keeps_row_order(rows, uc, ic):
    df = frame(rows)
    out = kcore(df, uc, ic)
    pairs = list(zip(out["user_id"].to_list(), out["item_id"].to_list(), strict=True))
    assert pairs == naive_core(list(zip(df["user_id"].to_list(), df["item_id"].to_list(), strict=True)), uc, ic)
    if out.height:
        assert out.group_by("user_id").len()["len"].min() >= uc
        assert out.group_by("item_id").len()["len"].min() >= ic


@PROFILE
@given(interactions, st.integers(1, 3))
def test_the_split_never_leaks_a_held_out_interaction_into_training(rows, k):
    with tempfile.TemporaryDirectory() as tmp:
        paths = CatalogPaths.of("p", Path(tmp))
        paths.root.mkdir(parents=True)
        df = frame(rows).unique(["user_id", "item_id", "timestamp"], maintain_order=True)  # as ingest writes it
        df.with_columns(pl.lit(4.0, pl.Float32).alias("rating")).write_parquet(paths.interactions)
        items = df["item_id"].unique().sort()
        pl.DataFrame({"item_id": items, "category": [f"c{len(i) % 2}" for i in items],
                      "categories": [[f"c{len(i) % 2}"] for i in items]},
                     schema={"item_id": pl.String, "category": pl.String, "categories": pl.List(pl.String)}
                     ).write_parquet(paths.items)
        core = kcore(df, k, k)
        if core.is_empty():
            with pytest.raises(SplitError, match="nothing survives"):
                run_split("p", SplitParams(user_core=k, item_core=k), paths)
            return
        summary = run_split("p", SplitParams(user_core=k, item_core=k), paths)
        split = load_splits(paths.splits_dir)

    assert summary.counts["interactions"] == core.height and split.num_items == core["item_id"].n_unique()
    assert sorted(split.user_ids) == sorted(core["user_id"].unique().to_list())
    assert sum(len(s) for s in split.sequences) == core.height  # every kept interaction exactly once
    index = {item: n + 1 for n, item in enumerate(split.item_ids)}
    train = split.train_sequences()
    _, test_targets, test_rows = split.held_out("test", 50)
    _, valid_targets, valid_rows = split.held_out("valid", 50)
    assert list(test_rows) == list(valid_rows)
    for n, user in enumerate(test_rows):
        seq = split.sequences[user]
        assert len(train[user]) >= 1  # every test user has a training item
        assert test_targets[n] == seq[-1] and valid_targets[n] == seq[-2]
        assert list(train[user]) == list(seq[:-2])  # the held-out positions are not trained on
    for user, seq in zip(split.user_ids, split.sequences, strict=True):
        mine = core.filter(pl.col("user_id") == user).with_row_index("_r").sort(["timestamp", "_r"])
        assert list(seq) == [index[i] for i in mine["item_id"].to_list()]  # chronological, ties in file order
        assert np.all(seq >= 1) and np.all(seq <= split.num_items)
