"""features/store.py: round trip, upsert bookkeeping, resume after a kill, the aligned reader."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.store import (
    EncodedChunk,
    FeatureRows,
    load_features,
    parts_dir,
    read_rows,
    upsert,
    write_rows,
)

IDENTITY = {"modality": "text", "model": "fake", "revision": None, "pooling": "mean"}


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def fake_vector(sha: str, dim: int = 4) -> np.ndarray:
    """A deterministic embedding derived from the content hash."""
    return (
        np.frombuffer(hashlib.sha256(sha.encode()).digest()[: 4 * dim], np.uint32).astype(np.float32) / 2**32
    )


class FakeEncoder:
    """Records every position it is asked to encode; can fail on chosen items or crash on call k."""

    def __init__(
        self, shas: Sequence[str], fail: dict[int, str] | None = None, crash_on_call: int | None = None
    ):
        self.shas, self.fail, self.crash_on_call = shas, fail or {}, crash_on_call
        self.calls: list[list[int]] = []

    def __call__(self, positions: Sequence[int], progress: Callable[[int], None]) -> EncodedChunk:
        self.calls.append(list(positions))
        if self.crash_on_call == len(self.calls):
            raise Killed("killed")
        ok = [p for p in positions if p not in self.fail]
        progress(len(positions))
        return EncodedChunk(
            ok,
            np.stack([fake_vector(self.shas[p]) for p in ok]),
            {p: self.fail[p] for p in positions if p in self.fail},
        )

    @property
    def encoded(self) -> list[int]:
        return [p for call in self.calls for p in call]


def run(path, items: dict[str, str], identity=IDENTITY, **kw):
    ids, shas = list(items), list(items.values())
    encoder = FakeEncoder(shas, **{k: kw.pop(k) for k in ("fail", "crash_on_call") if k in kw})
    report = upsert(path, ids, shas, identity, encoder, info={"torch_version": "x"}, **kw)
    return report, encoder


def test_round_trip_keeps_values_order_and_metadata(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    rows = FeatureRows(["b", "a", "c"], ["s1", "s2", "s3"], emb, {"model": "m", "pooling": "cls"})
    write_rows(tmp_path / "f.parquet", rows)

    table = pq.read_table(tmp_path / "f.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    back = read_rows(tmp_path / "f.parquet")
    assert back.item_ids == ["b", "a", "c"] and back.shas == ["s1", "s2", "s3"]
    np.testing.assert_array_equal(back.embeddings, emb)
    assert back.metadata == {"model": "m", "pooling": "cls", "dim": "4"}
    assert read_rows(tmp_path / "absent.parquet") is None


def test_upsert_encodes_only_new_or_changed_and_drops_deleted(tmp_path):
    path = tmp_path / "text.parquet"
    first, enc = run(path, {"a": "h1", "b": "h2", "c": "h3"})
    assert (first.encoded, first.reused, first.removed, first.total, first.dim) == (3, 0, 0, 3, 4)
    assert enc.encoded == [0, 1, 2]

    # b changed, c deleted, d added; a untouched
    second, enc = run(path, {"a": "h1", "b": "h2-new", "d": "h4"})
    assert enc.encoded == [1, 2]  # positions of b and d
    assert (second.encoded, second.reused, second.removed, second.total) == (2, 1, 1, 3)
    rows = read_rows(path)
    assert rows.item_ids == ["a", "b", "d"] and rows.shas == ["h1", "h2-new", "h4"]
    np.testing.assert_array_equal(rows.embeddings, np.stack([fake_vector(s) for s in ("h1", "h2-new", "h4")]))
    assert rows.metadata["model"] == "fake" and rows.metadata["revision"] == ""
    assert rows.metadata["torch_version"] == "x" and rows.metadata["dim"] == "4"

    third, enc = run(path, {"a": "h1", "b": "h2-new", "d": "h4"})
    assert enc.calls == [] and (third.encoded, third.reused, third.removed) == (0, 3, 0)


def test_identity_change_rebuilds(tmp_path):
    path = tmp_path / "text.parquet"
    run(path, {"a": "h1", "b": "h2"})
    report, enc = run(path, {"a": "h1", "b": "h2"}, identity={**IDENTITY, "pooling": "cls"})
    assert report.rebuilt and enc.encoded == [0, 1] and report.reused == 0
    assert read_rows(path).metadata["pooling"] == "cls"


def test_failures_get_no_row_and_are_retried(tmp_path):
    path = tmp_path / "image.parquet"
    report, _ = run(path, {"a": "h1", "b": "h2", "c": "h3"}, fail={1: "cannot decode"})
    assert report.failures == {"b": "cannot decode"} and report.total == 2
    assert read_rows(path).item_ids == ["a", "c"]
    again, enc = run(path, {"a": "h1", "b": "h2", "c": "h3"})
    assert enc.encoded == [1] and again.total == 3


def test_kill_midway_keeps_old_store_and_resume_skips_finished_chunks(tmp_path):
    path = tmp_path / "text.parquet"
    old = {f"i{k}": f"h{k}" for k in range(3)}
    run(path, old)
    before = path.read_bytes()

    items = {**old, **{f"n{k}": f"g{k}" for k in range(7)}}  # 7 new items, chunks of 3
    with pytest.raises(Killed):
        run(path, items, chunk_size=3, crash_on_call=2)
    assert path.read_bytes() == before  # the previous store is untouched
    parts = sorted(parts_dir(path).glob("part-*.parquet"))
    assert len(parts) == 1 and read_rows(parts[0]).item_ids == ["n0", "n1", "n2"]

    report, enc = run(path, items, chunk_size=3)
    assert enc.encoded == [6, 7, 8, 9]  # n3..n6: the finished chunk is not redone
    assert (report.encoded, report.resumed, report.reused, report.total) == (4, 3, 3, 10)
    assert not parts_dir(path).exists()
    rows = read_rows(path)
    assert rows.item_ids == list(items)
    np.testing.assert_array_equal(rows.embeddings, np.stack([fake_vector(s) for s in items.values()]))


def test_parts_of_another_identity_are_discarded(tmp_path):
    path = tmp_path / "text.parquet"
    items = {f"i{k}": f"h{k}" for k in range(4)}
    with pytest.raises(Killed):
        run(path, items, chunk_size=2, crash_on_call=2)
    report, enc = run(path, items, identity={**IDENTITY, "model": "other"}, chunk_size=2)
    assert enc.encoded == [0, 1, 2, 3] and report.resumed == 0


def test_load_features_aligns_to_the_given_order_with_a_mask(tmp_path):
    path = tmp_path / "f.parquet"
    emb = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    write_rows(path, FeatureRows(["a", "b", "c"], ["x", "y", "z"], emb))

    features, present = load_features(path, ["c", "zz", "a"])
    np.testing.assert_array_equal(features, [[5, 6], [0, 0], [1, 2]])
    np.testing.assert_array_equal(present, [True, False, True])


def test_load_features_without_a_store_gives_width_zero(tmp_path):
    features, present = load_features(tmp_path / "absent.parquet", ["a", "b"])
    assert features.shape == (2, 0) and features.dtype == np.float32 and not present.any()

    write_rows(tmp_path / "empty.parquet", FeatureRows([], [], np.zeros((0, 8), np.float32)))
    features, present = load_features(tmp_path / "empty.parquet", ["a"])
    assert features.shape == (1, 0) and not present.any()
