import numpy as np
import polars as pl

from cammsr.core.config import SplitParams
from cammsr.core.paths import CatalogPaths
from cammsr.data.splits import load_splits, run_split


def test_leave_one_out_with_stable_ties(tmp_path):
    paths = CatalogPaths.of("t", tmp_path)
    paths.root.mkdir(parents=True)
    # u1's last two items share a day: the raw order (b before c) must decide, every time.
    pl.DataFrame({
        "user_id": ["u1", "u1", "u2", "u1", "u1", "u2", "u2"],
        "item_id": ["a", "d", "a", "b", "c", "b", "c"],
        "timestamp": [1, 0, 1, 5, 5, 2, 3],
        "rating": [1.0] * 7,
    }).write_parquet(paths.interactions)
    pl.DataFrame({"item_id": ["a", "b", "c", "d"], "category": ["x", "y", "x", None]}).write_parquet(paths.items)
    summary = run_split("t", SplitParams(user_core=1, item_core=1), paths)
    split = load_splits(paths.splits_dir)
    assert split.item_ids == ["a", "b", "c", "d"]
    assert split.category_names == ["unknown", "x", "y"]
    assert split.item_category.tolist() == [-1, 1, 2, 1, 0]
    assert split.user_ids == ["u1", "u2"]
    assert [s.tolist() for s in split.sequences] == [[4, 1, 2, 3], [1, 2, 3]]
    hist, targets, rows = split.held_out("test", max_len=50)
    assert targets.tolist() == [3, 3] and [h.tolist() for h in hist] == [[4, 1, 2], [1, 2]]
    hist, targets, _ = split.held_out("valid", max_len=2)
    assert targets.tolist() == [2, 2] and [h.tolist() for h in hist] == [[4, 1], [1]]
    assert [s.tolist() for s in split.train_sequences()] == [[4, 1], [1]]
    assert summary.counts["users_tie_at_test"] == 1 and summary.counts["users_tie_at_valid"] == 0


def test_split_of_tiny_catalog(tiny_catalog):
    s = run_split("tiny", SplitParams(), tiny_catalog)
    assert s.counts["users"] == 120 and s.counts["items"] == 40
    split = load_splits(tiny_catalog.splits_dir)
    assert all(len(seq) == 8 for seq in split.sequences)
    assert np.all(np.diff(split.sequences[0]) % 40 == 1)


def test_split_writes_category_path_tokens_for_the_multi_hot_loss(tmp_path):
    import polars as pl

    from tests.cammsr.conftest import write_tiny_catalog

    paths = write_tiny_catalog(tmp_path, n_users=20, n_items=6, length=6)
    ids = [f"i{i:03d}" for i in range(6)]
    pl.DataFrame({"item_id": ids, "category": [f"c{i % 2}" for i in range(6)],
                  "categories": [["Root", f"c{i % 2}", f"leaf{i}"] if i else [] for i in range(6)]}
                 ).write_parquet(paths.items)
    run_split("tiny", SplitParams(user_core=1, item_core=1), paths)
    split = load_splits(paths.splits_dir)
    assert split.path_tokens == sorted({"Root", "c0", "c1", *[f"leaf{i}" for i in range(1, 6)]})
    row = 1 + split.item_ids.index("i003")
    assert [split.path_tokens[t] for t in split.item_paths[row] if t >= 0] == ["Root", "c1", "leaf3"]
    assert (split.item_paths[1 + split.item_ids.index("i000")] == -1).all()  # no path: no tokens
    assert (split.item_paths[0] == -1).all()
