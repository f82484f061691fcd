"""cammsr/ingest.py end to end on small catalogs built here (file: URLs and a loopback server)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from pytest_httpserver import HTTPServer

from cammsr.core.config import CatalogParams, IngestParams
from cammsr.core.paths import CatalogPaths
from cammsr.ingest.download import RetryPolicy, raw_name
from cammsr.ingest.images import IMAGES_SCHEMA
from cammsr.ingest.normalize import INTERACTIONS_SCHEMA, ITEMS_SCHEMA
from cammsr.ingest.quarantine import QuarantineLimitError
from cammsr.ingest.stage import run_ingest

FAST = RetryPolicy(retries=1, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.02)
REVIEWS_URL, META_URL = "file:src/reviews_T_5.json.gz", "file:src/meta_T.json.gz"
T0 = 1_400_000_000  # 2014-05-13: review times are T0 + t (inside ingest's window)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def review(user: str, item: str, t: int, rating: float) -> str:
    return json.dumps({"reviewerID": user, "asin": item, "overall": rating, "unixReviewTime": T0 + t,
                       "helpful": [0, 0], "reviewText": "..."})


def build_catalog(root: Path) -> None:
    """7 review lines (1 duplicate, 1 truncated), 5 meta lines (1 unreviewed item, 1 repeat)."""
    src = root / "src"
    (src / "images").mkdir(parents=True)
    lines = [
        review("u1", "I2", 300, 4.0),  # 1: not in time order: raw order must survive
        review("u1", "I1", 100, 5.0),  # 2
        review("u2", "I1", 100, 3.0),  # 3
        review("u1", "I1", 100, 1.0),  # 4: same (user, item, time) as line 2 -> dropped
        '{"reviewerID": "u3", "asin": "I3", "overa',  # 5: truncated -> quarantined
        review("u3", "I3", 200, 2.0),  # 6
        review("u2", "I4", 50, 5.0),  # 7: I4 has no metadata
    ]
    (src / "reviews_T_5.json.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    meta = [
        {"asin": "I1", "title": "Red Puzzle", "brand": "Acme", "description": "Jigsaw.",
         "categories": [["Toys & Games", "Puzzles", "Jigsaw"], ["Gifts"]], "imUrl": "images/I1.png"},
        {"asin": "I2", "title": "Ball", "categories": [["Sports"]], "imUrl": "images/I2.jpg"},
        {"asin": "I3", "title": "No picture"},
        {"asin": "I9", "title": "Nobody reviewed me"},
        {"asin": "I1", "title": "A later duplicate record"},
    ]
    (src / "meta_T.json.gz").write_bytes(gzip.compress("".join(repr(m) + "\n" for m in meta).encode()))
    (src / "images" / "I1.png").write_bytes(png())
    (src / "images" / "I2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")


def test_end_to_end_on_file_urls(tmp_path: Path) -> None:
    build_catalog(tmp_path)
    catalog = CatalogParams(reviews=REVIEWS_URL, meta=META_URL, images=True)
    params = IngestParams(concurrency=2, max_quarantine_fraction=0.2)
    paths = CatalogPaths.of("t", tmp_path / "data")
    summary = run_ingest("t", catalog, params, paths, root=tmp_path, policy=FAST)

    interactions = pq.read_table(paths.interactions)
    assert interactions.schema.equals(INTERACTIONS_SCHEMA)
    assert [(u, i, t - T0, r) for u, i, t, r in (tuple(r.values()) for r in interactions.to_pylist())] == [
        ("u1", "I2", 300, 4.0), ("u1", "I1", 100, 5.0), ("u2", "I1", 100, 3.0), ("u3", "I3", 200, 2.0),
        ("u2", "I4", 50, 5.0),
    ]
    items = pq.read_table(paths.items)
    assert items.schema.equals(ITEMS_SCHEMA)
    assert items.to_pylist() == [
        {"item_id": "I2", "title": "Ball", "description": None, "brand": None, "categories": ["Sports"],
         "category": "Sports", "image_url": "file:src/images/I2.jpg"},
        {"item_id": "I1", "title": "Red Puzzle", "description": "Jigsaw.", "brand": "Acme",
         "categories": ["Toys & Games", "Puzzles", "Jigsaw"], "category": "Puzzles",
         "image_url": "file:src/images/I1.png"},
        {"item_id": "I3", "title": "No picture", "description": None, "brand": None, "categories": [],
         "category": "unknown", "image_url": None},
        {"item_id": "I4", "title": None, "description": None, "brand": None, "categories": [],
         "category": "unknown", "image_url": None},
    ]
    images = pq.read_table(paths.images_table)
    assert images.schema.equals(IMAGES_SCHEMA)
    status = dict(zip(images["item_id"].to_pylist(), images["status"].to_pylist(), strict=True))
    assert status["I1"] == "ok" and status["I3"] == status["I4"] == "missing"
    assert status["I2"].startswith("failed: undecodable")
    i1_path = {r["item_id"]: r["path"] for r in images.to_pylist()}["I1"]
    assert (paths.root / i1_path).read_bytes() == png()

    reviews_file = f"raw/{raw_name(REVIEWS_URL)}"
    quarantined = [json.loads(x) for x in paths.quarantine.read_text().splitlines()]
    assert [(q["file"], q["line"]) for q in quarantined] == [(reviews_file, 5)]
    manifest = json.loads(paths.manifest.read_text())
    assert sorted(manifest) == sorted([raw_name(REVIEWS_URL), raw_name(META_URL)])

    raw_bytes = sum(e["bytes"] for e in manifest.values())
    counts = summary.counts
    assert counts == {
        "reviews_lines": 7, "interactions": 5, "duplicates_dropped": 1, "users": 3, "items": 4,
        "items_without_meta": 1, "meta_lines": 5, "meta_unused": 1, "meta_duplicates": 1, "quarantined": 1,
        "quarantined_by_file": {reviews_file: 1, f"raw/{raw_name(META_URL)}": 0}, "out_of_window": 0,
        "images_ok": 1, "images_missing": 2, "images_failed": 1, "images_refused": 0, "images_reused": 0,
        "bytes_downloaded": raw_bytes + len(png()) + len(b"\xff\xd8\xff\xe0 truncated jpeg"),
        "files_unchanged": 0,
    }
    assert summary.stage == "ingest"
    assert json.loads(paths.summary("ingest").read_text())["counts"] == counts

    again = run_ingest("t", catalog, params, paths, root=tmp_path, policy=FAST)  # nothing changed
    assert again.counts["files_unchanged"] == 2 and again.counts["images_reused"] == 1
    assert again.counts["bytes_downloaded"] == len(b"\xff\xd8\xff\xe0 truncated jpeg")  # failures retried
    assert pq.read_table(paths.interactions).equals(interactions) and pq.read_table(paths.items).equals(items)


def test_too_many_malformed_lines_fail_after_writing_the_quarantine(tmp_path: Path) -> None:
    build_catalog(tmp_path)
    catalog = CatalogParams(reviews=REVIEWS_URL, meta=META_URL, images=False)
    paths = CatalogPaths.of("t", tmp_path / "data")
    with pytest.raises(QuarantineLimitError) as err:
        run_ingest("t", catalog, IngestParams(max_quarantine_fraction=0.1), paths, root=tmp_path, policy=FAST)
    message = str(err.value)
    assert f"raw/{raw_name(REVIEWS_URL)}: 1 of 7 records quarantined" in message
    assert str(paths.quarantine) in message
    assert json.loads(paths.quarantine.read_text())["line"] == 5
    assert not paths.interactions.exists()


def test_images_off_and_no_meta(tmp_path: Path) -> None:
    build_catalog(tmp_path)
    paths = CatalogPaths.of("t", tmp_path / "data")
    catalog = CatalogParams(reviews=str(tmp_path / "src" / "reviews_T_5.json.gz"), images=False)
    summary = run_ingest("t", catalog, IngestParams(max_quarantine_fraction=0.2), paths, root=tmp_path,
                         policy=FAST)
    assert summary.counts["items_without_meta"] == 4 and summary.counts["images_missing"] == 4
    assert set(pq.read_table(paths.images_table)["status"].to_pylist()) == {"missing"}
    assert set(pq.read_table(paths.items)["category"].to_pylist()) == {"unknown"}


def test_unreviewed_items_join_the_catalog_when_asked(tmp_path: Path) -> None:
    build_catalog(tmp_path)
    catalog = CatalogParams(reviews=REVIEWS_URL, meta=META_URL, images=False, unreviewed_items=True)
    paths = CatalogPaths.of("t", tmp_path / "data")
    summary = run_ingest("t", catalog, IngestParams(max_quarantine_fraction=0.2), paths, root=tmp_path,
                         policy=FAST)
    items = pq.read_table(paths.items)
    assert items["item_id"].to_pylist() == ["I2", "I1", "I3", "I4", "I9"]
    assert items["title"].to_pylist()[-1] == "Nobody reviewed me"
    assert pq.read_table(paths.images_table)["item_id"].to_pylist() == items["item_id"].to_pylist()
    assert (summary.counts["items"], summary.counts["unreviewed_items"], summary.counts["meta_unused"]) == (5, 1, 1)
    assert pq.read_table(paths.interactions)["item_id"].to_pylist() == ["I2", "I1", "I1", "I3", "I4"]


def test_end_to_end_over_http_with_2023_files(httpserver: HTTPServer, tmp_path: Path) -> None:
    reviews = [{"user_id": "a", "parent_asin": "P1", "rating": 5.0, "timestamp": 1_500_000_000_123},
               {"user_id": "b", "parent_asin": "P2", "rating": 4.0, "timestamp": 1_500_000_001_000}]
    meta = [{"parent_asin": "P1", "title": "t1", "store": "S", "main_category": "Books",
             "categories": ["Books", "Fiction"], "images": [{"large": "/img/p1.png", "hi_res": None}]},
            {"parent_asin": "P2", "title": "t2", "main_category": "Books", "categories": [],
             "images": [{"large": "http://127.0.0.1:1/unreachable.png"}]}]
    httpserver.expect_request("/d/Books.jsonl.gz").respond_with_data(
        gzip.compress("".join(json.dumps(r) + "\n" for r in reviews).encode()), headers={"ETag": '"r1"'})
    httpserver.expect_request("/d/meta_Books.jsonl").respond_with_data(
        "".join(json.dumps(m) + "\n" for m in meta))
    httpserver.expect_request("/img/p1.png").respond_with_data(png())
    catalog = CatalogParams(reviews=httpserver.url_for("/d/Books.jsonl.gz"),
                            meta=httpserver.url_for("/d/meta_Books.jsonl"))
    paths = CatalogPaths.of("b", tmp_path / "data")
    summary = run_ingest("b", catalog, IngestParams(), paths, root=tmp_path, policy=FAST)

    assert pq.read_table(paths.interactions)["timestamp"].to_pylist() == [1_500_000_000, 1_500_000_001]
    items = pq.read_table(paths.items).to_pylist()
    assert items[0]["image_url"] == httpserver.url_for("/img/p1.png") and items[0]["category"] == "Fiction"
    assert items[1]["categories"] == ["Books"] and items[1]["category"] == "Books"
    statuses = pq.read_table(paths.images_table)["status"].to_pylist()
    assert statuses[0] == "ok" and statuses[1].startswith("failed: network error")
    assert summary.counts["images_ok"] == 1 and summary.counts["images_failed"] == 1
    assert json.loads(paths.manifest.read_text())[raw_name(catalog.reviews)]["etag"] == '"r1"'
