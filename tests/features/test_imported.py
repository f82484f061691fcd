"""Precomputed features: each format reads back exactly, bad files are clear errors, the store contract holds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cammsr.core.config import PrecomputedFeatures
from cammsr.core.paths import CatalogPaths
from features.imported import FeatureFileError, detect_format, import_features, read_features, read_index
from features.store import IDENTITY_KEY, load_features, read_rows

IDS = ["B01", "B02", "B03", "B04"]


def _matrix(rows: int = 4, dim: int = 3) -> np.ndarray:
    return (np.arange(rows * dim, dtype=np.float32).reshape(rows, dim) + 1) / 10


def _unisrec(tmp_path, emb: np.ndarray, ids=IDS, rows=None):
    feat, index = tmp_path / "Cat.feat3CLS", tmp_path / "Cat.item2index"
    emb.astype("<f4").tofile(feat)
    order = rows if rows is not None else range(len(ids))
    index.write_text("".join(f"{i}\t{r}\n" for i, r in zip(ids, order, strict=True)))
    return feat, index


def test_unisrec_rows_follow_the_index_not_the_line_order(tmp_path):
    emb = _matrix()
    feat, index = _unisrec(tmp_path, emb, ids=["B03", "B01", "B04", "B02"], rows=[2, 0, 3, 1])
    m = read_features(feat, index)
    assert m.format == "unisrec" and m.dim == 3
    assert m.item_ids == ["B01", "B02", "B03", "B04"]
    np.testing.assert_array_equal(m.embeddings, emb)


def test_width_inconsistent_with_the_file_size_is_an_error_naming_the_file(tmp_path):
    feat, index = _unisrec(tmp_path, _matrix(4, 3))
    with open(feat, "ab") as fh:
        fh.write(np.float32(1).tobytes())  # 13 values for 4 rows
    with pytest.raises(FeatureFileError, match=r"Cat.feat3CLS: 13 float32 values do not split into 4 rows"):
        read_features(feat, index)


def test_a_nan_row_is_an_error_naming_row_and_item(tmp_path):
    emb = _matrix()
    emb[2, 1] = np.nan
    feat, index = _unisrec(tmp_path, emb)
    with pytest.raises(FeatureFileError, match=r"row 2 \(item 'B03'\) has NaN or inf"):
        read_features(feat, index)


def test_npy_index_length_must_equal_rows(tmp_path):
    np.save(tmp_path / "f.npy", _matrix(4, 2))
    (tmp_path / "ids.txt").write_text("B01\nB02\nB03\n")
    with pytest.raises(FeatureFileError, match=r"3 items for 4 rows"):
        read_features(tmp_path / "f.npy", tmp_path / "ids.txt")


def test_mmrec_mapping_with_header_is_detected_and_read(tmp_path):
    emb = _matrix(3, 2)
    np.save(tmp_path / "image_feat.npy", emb)
    (tmp_path / "i_id_mapping.csv").write_text("asin\titemID\nB02\t1\nB01\t0\nB03\t2\n")
    assert detect_format(tmp_path / "image_feat.npy", tmp_path / "i_id_mapping.csv") == "mmrec"
    m = read_features(tmp_path / "image_feat.npy", tmp_path / "i_id_mapping.csv")
    assert m.item_ids == ["B01", "B02", "B03"]
    np.testing.assert_array_equal(m.embeddings, emb)


def test_parquet_needs_no_index(tmp_path):
    table = pa.table({"item_id": ["B01", "B02"], "embedding": [[1.0, 2.0], [3.0, 4.0]]})
    pq.write_table(table, tmp_path / "f.parquet")
    m = read_features(tmp_path / "f.parquet", None)
    assert m.format == "parquet" and m.item_ids == ["B01", "B02"]
    np.testing.assert_array_equal(m.embeddings, [[1, 2], [3, 4]])


@pytest.mark.parametrize("text, message", [
    ("B01\t0\nB02\t0\n", "row 0 is given to 'B01' and to 'B02'"),
    ("B01\t0\nB01\t1\n", "item 'B01' is listed twice"),
    ("B01\t0\nB02\tx\n", "row 'x' is not an integer"),
    ("asin\titemID\n", "a header line and no items"),
    ("B01\t0\nB02\t2\n", "rows are not 0..1"),
    ("", "empty index"),
])
def test_bad_index_lines_are_named(tmp_path, text, message):
    (tmp_path / "idx").write_text(text)
    with pytest.raises(FeatureFileError, match=message):
        read_index(tmp_path / "idx")


def _catalog(tmp_path, items) -> CatalogPaths:
    paths = CatalogPaths.of("cat", tmp_path / "data")
    paths.root.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": items}), paths.items)
    pq.write_table(pa.table({"item_id": items, "status": ["missing"] * len(items)}), paths.images_table)
    return paths


def test_import_writes_the_store_contract_aligned_to_the_catalog(tmp_path):
    emb = _matrix()
    feat, index = _unisrec(tmp_path, emb)
    paths = _catalog(tmp_path, ["B02", "B04", "B09"])  # B09 is not in the file; B01, B03 are extra rows
    source = PrecomputedFeatures(file="file:Cat.feat3CLS", index="file:Cat.item2index", provenance="CLIP ViT-B/32")
    s = import_features("cat", "image", source, paths, feat, index)
    assert s.counts | {} == {"imported": 2, "reused": 0, "absent": 1, "extra_rows": 2, "total": 3, "dim": 3,
                              "format": "unisrec"}
    rows = read_rows(paths.image_features)
    assert rows.item_ids == ["B02", "B04"]
    np.testing.assert_array_equal(rows.embeddings, emb[[1, 3]])
    identity = json.loads(rows.metadata[IDENTITY_KEY])
    assert identity["precomputed"] is True and identity["provenance"] == "CLIP ViT-B/32"
    assert rows.metadata["precomputed"] == "true" and len(rows.metadata["source_sha256"]) == 64
    feats, present = load_features(paths.image_features, ["B09", "B04"])
    assert present.tolist() == [False, True]
    np.testing.assert_array_equal(feats[1], emb[3])


def test_reimport_of_the_same_file_leaves_the_store_untouched_and_a_changed_file_replaces_it(tmp_path):
    emb = _matrix()
    feat, index = _unisrec(tmp_path, emb)
    paths = _catalog(tmp_path, IDS)
    source = PrecomputedFeatures(file="file:f", index="file:i")
    import_features("cat", "text", source, paths, feat, index)
    before = paths.text_features.stat().st_mtime_ns, paths.text_features.read_bytes()
    again = import_features("cat", "text", source, paths, feat, index)
    assert (again.counts["imported"], again.counts["reused"]) == (0, 4)
    assert (paths.text_features.stat().st_mtime_ns, paths.text_features.read_bytes()) == before
    _unisrec(tmp_path, emb * 2)
    changed = import_features("cat", "text", source, paths, feat, index)
    assert changed.counts["imported"] == 4
    np.testing.assert_array_equal(read_rows(paths.text_features).embeddings, emb * 2)


def test_ingest_records_the_feature_files_hashes_and_nothing_else():
    from pathlib import Path

    from cammsr.core.config import CatalogParams
    from cammsr.ingest.download import FetchResult, ManifestEntry
    from cammsr.ingest.stage import precomputed_record

    def fetched(url, sha):
        return FetchResult("n", Path("n"), ManifestEntry(url=url, sha256=sha, bytes=1, fetched_at="t"), True, 1)

    catalog = CatalogParams(reviews="file:r", meta="file:m", image_features={"file": "file:f", "index": "file:i",
                                                                              "provenance": "CLIP"})
    record = precomputed_record(catalog, [fetched("file:r", "r1"), fetched("file:m", "m1"),
                                          fetched("file:f", "f1"), fetched("file:i", "i1")])
    assert record == {"text": None, "image": {"file": "file:f", "sha256": "f1", "index": "file:i",
                                              "index_sha256": "i1", "format": "auto", "provenance": "CLIP"}}
    # new reviews or metadata leave it as it was, so the encode stages that watch it do not rerun
    again = precomputed_record(catalog, [fetched("file:r", "r2"), fetched("file:m", "m2"),
                                         fetched("file:f", "f1"), fetched("file:i", "i1")])
    assert again == record
