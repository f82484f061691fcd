"""cammsr/images.py: ok / missing / failed rows, the hashed layout, and reuse on a second run."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pytest_httpserver import HTTPServer

from cammsr.core.config import IngestParams
from cammsr.ingest.download import RetryPolicy
from cammsr.ingest.images import IMAGES_SCHEMA, fetch_images, image_path, missing_images_table

FAST = RetryPolicy(retries=2, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.02)


def encode(fmt: str, size: int = 8, noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    shape = (size, size, 3)
    pixels = rng.integers(0, 255, shape, dtype=np.uint8) if noise else np.full(shape, 90, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_statuses_layout_and_reuse(httpserver: HTTPServer, tmp_path: Path) -> None:
    png, jpg, big = encode("PNG"), encode("JPEG"), encode("PNG", 64, noise=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "local.jpg").write_bytes(jpg)
    httpserver.expect_request("/a.png").respond_with_data(png, content_type="image/png")
    httpserver.expect_request("/corrupt.jpg").respond_with_data(jpg[: len(jpg) // 2])
    httpserver.expect_request("/text.jpg").respond_with_data(b"<html>not an image</html>")
    httpserver.expect_request("/gone.jpg").respond_with_data("", status=404)
    httpserver.expect_request("/big.png").respond_with_data(big)
    httpserver.expect_request("/down.jpg").respond_with_data("", status=503)
    items = [
        ("A", httpserver.url_for("/a.png")),
        ("N", None),
        ("C", httpserver.url_for("/corrupt.jpg")),
        ("T", httpserver.url_for("/text.jpg")),
        ("G", httpserver.url_for("/gone.jpg")),
        ("L", "file:src/local.jpg"),
        ("F", "file:src/nothere.jpg"),
        ("B", httpserver.url_for("/big.png")),
        ("D", httpserver.url_for("/down.jpg")),
    ]
    cat = tmp_path / "cat"
    params = IngestParams(concurrency=3, max_image_bytes=len(big) - 1)
    table, counts = fetch_images(items, cat, cat / "images.parquet", params, root=tmp_path, policy=FAST,
                                 local_root=tmp_path / "src")

    assert table.schema == IMAGES_SCHEMA
    rows = {r["item_id"]: r for r in table.to_pylist()}
    assert [r["item_id"] for r in table.to_pylist()] == [i for i, _ in items]  # input order
    status = {k: r["status"] for k, r in rows.items()}
    assert status["A"] == status["L"] == "ok"
    assert status["N"] == status["G"] == status["F"] == "missing"
    assert status["C"] == "failed: undecodable (OSError: Truncated File Read)"
    assert status["T"] == "failed: undecodable (not a known image format)"
    assert status["B"] == f"failed: too large ({len(big)} > {len(big) - 1} bytes)"
    assert status["D"] == "failed: network error: gave up after 3 attempts: TransientError('HTTP 503')"
    assert (counts.ok, counts.missing, counts.failed, counts.reused) == (2, 3, 4, 0)

    url_a = httpserver.url_for("/a.png")
    expected = image_path("A", url_a, "png")
    assert expected.parts[:2] == ("images", hashlib.sha256(b"A").hexdigest()[:2])
    assert expected.name == hashlib.sha256(url_a.encode()).hexdigest() + ".png"
    assert rows["A"]["path"] == expected.as_posix() and (cat / expected).read_bytes() == png
    assert rows["A"]["sha256"] == hashlib.sha256(png).hexdigest()
    assert rows["L"]["path"].endswith(".jpg") and rows["L"]["sha256"] == hashlib.sha256(jpg).hexdigest()
    assert rows["C"]["path"] is None and rows["C"]["sha256"] is None
    files = sorted(p.relative_to(cat).as_posix() for p in (cat / "images").rglob("*") if p.is_file())
    assert files == sorted([rows["A"]["path"], rows["L"]["path"]])  # nothing from the failures
    assert counts.bytes_downloaded == len(png) + len(jpg) + len(jpg) // 2 + len(b"<html>not an image</html>")

    pq.write_table(table, cat / "images.parquet")
    requests_before = len(httpserver.log)
    stored = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cat / "images").rglob("*") if p.is_file()}
    again, counts2 = fetch_images(items, cat, cat / "images.parquet", params, root=tmp_path, policy=FAST,
                                  local_root=tmp_path / "src")
    assert again.equals(table) and (counts2.ok, counts2.reused) == (2, 2)
    # the two ok images were neither fetched nor rewritten; every other URL was asked again, 503s with retries
    retried = Counter(r.path for r, _ in httpserver.log[requests_before:])
    assert retried == {"/corrupt.jpg": 1, "/text.jpg": 1, "/gone.jpg": 1, "/big.png": 1, "/down.jpg": 3}
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in stored} == stored
    assert counts2.bytes_downloaded == len(jpg) // 2 + len(b"<html>not an image</html>")

    (cat / rows["A"]["path"]).write_bytes(b"tampered")  # sha256 no longer matches: fetched again
    third, counts3 = fetch_images(items, cat, cat / "images.parquet", params, root=tmp_path, policy=FAST,
                                  local_root=tmp_path / "src")
    assert counts3.reused == 1 and (cat / rows["A"]["path"]).read_bytes() == png


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_guard(tmp_path: Path) -> None:
    (tmp_path / "wide.png").write_bytes(encode("PNG", size=64))
    params = IngestParams(max_image_pixels=64 * 64 - 1)
    table, counts = fetch_images([("W", "wide.png")], tmp_path / "cat", tmp_path / "none.parquet", params,
                                 root=tmp_path, policy=FAST, local_root=tmp_path)
    assert table["status"].to_pylist() == ["failed: too many pixels (> 4095)"] and counts.failed == 1


def test_images_off_means_every_item_missing() -> None:
    table = missing_images_table(["a", "b"])
    assert table.schema == IMAGES_SCHEMA
    assert table.to_pylist() == [
        {"item_id": "a", "path": None, "sha256": None, "status": "missing"},
        {"item_id": "b", "path": None, "sha256": None, "status": "missing"},
    ]
