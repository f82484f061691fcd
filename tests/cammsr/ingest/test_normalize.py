"""cammsr/normalize.py: streamed interactions with exact duplicate removal."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import cammsr.ingest.normalize as normalize
from cammsr.ingest.formats import ItemMeta, Review
from cammsr.ingest.normalize import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, build_items, write_interactions

REVIEWS = [
    Review("u1", "a", 10, 5.0),
    Review("u2", "b", 11, None),
    Review("u1", "a", 10, 3.0),  # duplicate of row 0 (same user, item, time; rating differs): dropped
    Review("u3", "c", 12, 4.0),
    Review("u1", "a", 13, 4.0),  # same user and item, another time: kept
    Review("u2", "b", 11, 1.0),  # duplicate of row 1, two batches later: dropped
    Review("u4", "a", 10, 2.0),
]
KEPT = [0, 1, 3, 4, 6]


def rows(path) -> list[tuple]:
    table = pq.read_table(path)
    assert table.schema.equals(INTERACTIONS_SCHEMA)
    return list(zip(*(table[c].to_pylist() for c in INTERACTIONS_SCHEMA.names), strict=True))


def expected(indices: list[int]) -> list[tuple]:
    return [(r.user_id, r.item_id, r.timestamp, r.rating) for r in (REVIEWS[i] for i in indices)]


@pytest.mark.parametrize("batch_rows", [2, 3, 100])
def test_streamed_interactions_keep_raw_order_and_drop_later_exact_duplicates(tmp_path, batch_rows):
    out = tmp_path / "interactions.parquet"
    stats = write_interactions(iter(REVIEWS), out, batch_rows=batch_rows)
    assert rows(out) == expected(KEPT)
    assert (stats.rows, stats.duplicates, stats.users) == (5, 2, 4)
    assert stats.item_ids == ["a", "b", "c"]
    assert [p.name for p in tmp_path.iterdir()] == ["interactions.parquet"]  # no first-pass file left


def test_a_hash_collision_never_drops_a_review(tmp_path, monkeypatch):
    # Every row hashes alike: all are compared by their exact key, and only true duplicates go.
    monkeypatch.setattr(normalize, "_key_hashes", lambda batch: np.zeros(len(batch), dtype=np.uint64))
    out = tmp_path / "interactions.parquet"
    stats = write_interactions(iter(REVIEWS), out, batch_rows=2)
    assert rows(out) == expected(KEPT)
    assert stats.duplicates == 2


def test_no_reviews_write_an_empty_table_with_the_schema(tmp_path):
    out = tmp_path / "interactions.parquet"
    stats = write_interactions(iter([]), out)
    assert rows(out) == [] and (stats.rows, stats.users, stats.item_ids) == (0, 0, [])


def test_items_follow_interaction_order_across_metadata_batches(monkeypatch):
    monkeypatch.setattr(normalize, "BATCH_ROWS", 2)  # several Arrow batches of described items
    metas = [ItemMeta(i, f"t{i}", None, None, ("Toys", f"C{i}"), f"img/{i}.jpg") for i in "edcba"]
    metas.insert(2, ItemMeta("e", "later copy", None, None, (), None))  # a repeat: the first record wins
    metas.append(ItemMeta("zz", "nobody reviewed it", None, None, (), None))
    table, stats = build_items(["a", "x", "c", "e"], metas, category_level=1, meta_url="https://h/meta.json.gz")
    assert table.schema.equals(ITEMS_SCHEMA)
    assert table["item_id"].to_pylist() == ["a", "x", "c", "e"]
    assert table["title"].to_pylist() == ["ta", None, "tc", "te"]
    assert table["categories"].to_pylist() == [["Toys", "Ca"], [], ["Toys", "Cc"], ["Toys", "Ce"]]
    assert table["category"].to_pylist() == ["Ca", "unknown", "Cc", "Ce"]
    assert table["image_url"].to_pylist() == ["https://h/img/a.jpg", None, "https://h/img/c.jpg", "https://h/img/e.jpg"]
    assert (stats.items_without_meta, stats.meta_unused, stats.meta_duplicates) == (1, 3, 1)  # unused: d, b, zz


def test_unreviewed_items_are_kept_after_the_reviewed_ones_when_asked():
    metas = [ItemMeta("b", "tb", None, None, ("Toys", "Cb"), None),
             ItemMeta("new1", "n1", None, None, ("Toys", "Cn"), "i.jpg"), ItemMeta("a", "ta", None, None, (), None),
             ItemMeta("new1", "a repeat", None, None, (), None), ItemMeta("new0", "n0", None, None, (), None)]
    table, stats = build_items(["a", "x", "b"], metas, category_level=1, meta_url="https://h/meta.json.gz",
                               keep_unreviewed=True)
    assert table["item_id"].to_pylist() == ["a", "x", "b", "new1", "new0"]  # reviewed first, then metadata order
    assert table["title"].to_pylist() == ["ta", None, "tb", "n1", "n0"]
    assert table["category"].to_pylist() == ["unknown", "unknown", "Cb", "Cn", "unknown"]
    assert table["image_url"].to_pylist()[3] == "https://h/i.jpg"
    assert (stats.items_without_meta, stats.meta_unused, stats.meta_duplicates) == (1, 2, 1)
    reviewed_only, _ = build_items(["a", "x", "b"], metas, category_level=1, meta_url=None)
    assert reviewed_only["item_id"].to_pylist() == ["a", "x", "b"]
