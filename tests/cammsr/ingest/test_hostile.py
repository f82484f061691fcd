"""The ingest stage against catalogs written to hurt: what they name is never read, what they hold never
stops the run or lands as silent wrong data, and a full disk is never taken for bad images."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from pytest_httpserver import HTTPServer

from cammsr.core.config import CatalogParams, IngestParams
from cammsr.core.paths import CatalogPaths
from cammsr.ingest.download import RetryPolicy, raw_name
from cammsr.ingest.stage import run_ingest

FAST = RetryPolicy(retries=1, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.02)
T0 = 1_400_000_000  # 2014-05-13


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def review(user: str, item: str, t: int) -> str:
    return json.dumps({"reviewerID": user, "asin": item, "overall": 5.0, "unixReviewTime": t})


def write_source(folder: Path, reviews: list[str], meta: list[dict]) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reviews.json.gz").write_bytes(gzip.compress("".join(r + "\n" for r in reviews).encode()))
    (folder / "meta.json").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return f"file:{folder.name}/reviews.json.gz", f"file:{folder.name}/meta.json"


def statuses(paths: CatalogPaths) -> dict[str, str]:
    table = pq.read_table(paths.images_table)
    return dict(zip(table["item_id"].to_pylist(), table["status"].to_pylist(), strict=True))


def stored_hashes(paths: CatalogPaths) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths.images_dir.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------- 1. image URLs that read local files


def test_image_urls_may_not_read_files_outside_the_metadata_folder(tmp_path):
    secret = png((1, 2, 3))  # a real image, outside the catalog's folder: copying it would pass every check
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(secret)
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "images" / "ok.png").write_bytes(png((9, 9, 9)))
    (tmp_path / "src" / "images" / "link.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    items = {"OK": "images/ok.png", "PASSWD": "/etc/passwd", "PASSWD_URL": "file:///etc/passwd",
             "UP": "../elsewhere/x.png", "UPUP": "../../elsewhere/x.png",
             "ABS": (tmp_path / "elsewhere/x.png").as_uri(),
             "LINK": "images/link.png", "FTP": "ftp://127.0.0.1/x.png", "HOST": "file://otherhost/etc/passwd"}
    reviews, meta = write_source(tmp_path / "src", [review("u1", i, T0 + k) for k, i in enumerate(items)],
                                 [{"asin": i, "title": i, "imUrl": url} for i, url in items.items()])
    paths = CatalogPaths.of("t", tmp_path / "data")
    summary = run_ingest("t", CatalogParams(reviews=reviews, meta=meta), IngestParams(), paths, root=tmp_path,
                         policy=FAST)

    status = statuses(paths)
    assert status["OK"] == "ok"
    refused = {i for i, s in status.items() if s.startswith("failed: refused: ")}
    assert refused == set(items) - {"OK"}, status
    assert "outside the metadata's folder" in status["UP"] and "outside" in status["LINK"]
    assert "scheme 'ftp'" in status["FTP"]
    assert hashlib.sha256(secret).hexdigest() not in stored_hashes(paths)  # never copied in
    assert len(list(paths.images_dir.rglob("*.*"))) == 1
    assert summary.counts["images_refused"] == len(items) - 1 and summary.counts["images_ok"] == 1


def test_metadata_over_http_may_not_name_local_files(tmp_path, httpserver: HTTPServer):
    outside = png((4, 5, 6))
    (tmp_path / "outside.png").write_bytes(outside)
    meta = [{"asin": "A", "imUrl": (tmp_path / "outside.png").as_uri()}, {"asin": "B", "imUrl": "img/b.png"},
            {"asin": "C", "imUrl": str(tmp_path / "outside.png")}]
    httpserver.expect_request("/c/meta.json").respond_with_data("".join(json.dumps(m) + "\n" for m in meta))
    httpserver.expect_request("/c/reviews.json").respond_with_data(
        "".join(review("u", i, T0) + "\n" for i in "ABC"))
    httpserver.expect_request("/c/img/b.png").respond_with_data(png((7, 7, 7)))
    catalog = CatalogParams(reviews=httpserver.url_for("/c/reviews.json"), meta=httpserver.url_for("/c/meta.json"))
    paths = CatalogPaths.of("web", tmp_path / "data")
    run_ingest("web", catalog, IngestParams(), paths, root=tmp_path, policy=FAST)

    status = statuses(paths)
    assert status["B"] == "ok"  # relative to the metadata's URL: fetched over http
    assert status["A"] == "failed: refused: a local path named by metadata that did not come from a local file"
    assert status["C"].startswith("failed: network error")  # an absolute path is one on the metadata's server
    assert hashlib.sha256(outside).hexdigest() not in stored_hashes(paths)


# ------------------------------------------------------------------------------ 2. timestamps out of any sense


def test_reviews_dated_outside_the_window_are_quarantined_with_the_reason(tmp_path):
    lines = [review("u1", "I1", T0), review("u1", "I2", T0 * 1000),  # milliseconds: the year 46,000
             review("u2", "I1", 500_000_000), review("u2", "I3", T0 + 1)]  # 1985: before any Amazon review
    reviews, _ = write_source(tmp_path / "src", lines, [])
    paths = CatalogPaths.of("t", tmp_path / "data")
    summary = run_ingest("t", CatalogParams(reviews=reviews, images=False), IngestParams(max_quarantine_fraction=0.5),
                         paths, root=tmp_path, policy=FAST)

    kept = pq.read_table(paths.interactions)
    assert kept["timestamp"].to_pylist() == [T0, T0 + 1]
    records = [json.loads(x) for x in paths.quarantine.read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in records] == [(f"raw/{raw_name(reviews)}", n) for n in (2, 3)]
    assert records[0]["reason"].startswith(f"unixReviewTime: {T0 * 1000} is after ")
    assert records[0]["reason"].endswith("milliseconds where seconds are expected?")
    assert records[1]["reason"] == "unixReviewTime: 500000000 is before 1995-01-01 (ingest.min_review_date)"
    assert summary.counts["out_of_window"] == 2 and summary.counts["interactions"] == 2

    # the window is a param: an older catalog can widen it
    wide = IngestParams(max_quarantine_fraction=0.5, min_review_date="1980-01-01")
    again = run_ingest("t", CatalogParams(reviews=reviews, images=False), wide, paths, root=tmp_path, policy=FAST)
    assert again.counts["out_of_window"] == 1 and again.counts["interactions"] == 3


# ------------------------------------------------------------------- 3. one record that breaks the parser itself


@pytest.mark.parametrize(("hostile", "reason"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to parse"),  # RecursionError in json
    ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nested too deeply to parse"),
    ("{'a': " + "(" * 100_000 + ")" * 100_000 + "}", "neither JSON nor a Python literal"),  # the 2014 literal path
])
def test_a_record_that_exhausts_the_parser_is_quarantined_not_fatal(tmp_path, hostile, reason):
    lines = [review(f"u{k}", "I1", T0 + k) for k in range(150)]
    lines.insert(100, hostile)
    reviews, meta = write_source(tmp_path / "src", lines, [{"asin": "I1", "title": "t"}])
    (tmp_path / "src" / "meta.json").write_text(hostile + "\n" + json.dumps({"asin": "I1", "title": "t"}) + "\n")
    paths = CatalogPaths.of("t", tmp_path / "data")
    summary = run_ingest("t", CatalogParams(reviews=reviews, meta=meta, images=False),
                         IngestParams(max_quarantine_fraction=0.5), paths, root=tmp_path, policy=FAST)

    assert summary.counts["interactions"] == 150 and summary.counts["quarantined"] == 2
    records = [json.loads(x) for x in paths.quarantine.read_text().splitlines()]
    assert [(r["file"].rsplit("-", 1)[-1], r["line"]) for r in records] == [("reviews.json.gz", 101), ("meta.json", 1)]
    assert all(r["reason"].startswith(reason) for r in records), records
    assert pq.read_table(paths.items)["title"].to_pylist() == ["t"]


# --------------------------------------------------------------------- 6. a full disk is not a bad image


def _catalog_with_images(tmp_path: Path, n: int = 6) -> CatalogParams:
    (tmp_path / "src" / "images").mkdir(parents=True)
    for k in range(n):
        (tmp_path / "src" / "images" / f"{k}.png").write_bytes(png((k, k, k)))
    reviews, meta = write_source(tmp_path / "src", [review("u", f"I{k}", T0 + k) for k in range(n)],
                                 [{"asin": f"I{k}", "imUrl": f"images/{k}.png"} for k in range(n)])
    return CatalogParams(reviews=reviews, meta=meta)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_out_of_space_stops_the_stage_and_keeps_the_previous_outputs(tmp_path, monkeypatch, code):
    catalog = _catalog_with_images(tmp_path)
    paths = CatalogPaths.of("t", tmp_path / "data")
    run_ingest("t", catalog, IngestParams(), paths, root=tmp_path, policy=FAST)
    before = {p: p.read_bytes() for p in (paths.interactions, paths.items, paths.images_table)}
    # the source changed (a new review), and the images must all be written again (none reusable)
    reviews = tmp_path / "src" / "reviews.json.gz"
    reviews.write_bytes(gzip.compress(gzip.decompress(reviews.read_bytes()) + (review("v", "I0", T0) + "\n").encode()))
    for image in paths.images_dir.rglob("*.png"):
        image.unlink()

    def full(*_args, **_kw):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("cammsr.ingest.images.write_bytes_atomic", full)
    with pytest.raises(OSError) as err:
        run_ingest("t", catalog, IngestParams(), paths, root=tmp_path, policy=FAST)
    assert type(err.value).__name__ == "StorageError" and err.value.exit_code == 1  # a fault, not bad input
    assert str(paths.images_dir) in str(err.value) and "previous outputs are intact" in str(err.value)
    assert {p: p.read_bytes() for p in before} == before
    assert not (paths.root / ".tmp").exists()


# ---------------------------------------------------------------------------- 8. modes of atomically written files


def test_outputs_get_the_mode_a_plain_write_gives(tmp_path):
    catalog = _catalog_with_images(tmp_path, 2)
    paths = CatalogPaths.of("t", tmp_path / "data")
    umask = os.umask(0o022)
    try:
        run_ingest("t", catalog, IngestParams(), paths, root=tmp_path, policy=FAST)
    finally:
        os.umask(umask)
    outputs = [paths.interactions, paths.items, paths.images_table, paths.quarantine, paths.manifest,
               paths.summary("ingest"), *paths.images_dir.rglob("*.png")]
    assert {oct(p.stat().st_mode & 0o777) for p in outputs} == {"0o644"}
    leftovers = [p for p in paths.root.rglob("*") if p.name.startswith(".") or p.suffix in (".tmp", ".part")]
    assert leftovers == []


def test_onboarding_reports_how_many_reviews_are_out_of_the_window(tmp_path):
    from cammsr.ops.source_check import check_source

    lines = [review(f"u{k % 5}", f"I{k % 4}", T0 + k) for k in range(40)] + [review("u0", "I1", T0 * 1000)]
    reviews, _ = write_source(tmp_path / "src", lines, [])
    report = check_source(reviews, None, tmp_path / "raw", policy=FAST, root=tmp_path, user_core=2,
                          max_quarantine_fraction=0.05)
    assert report.out_of_window == 1 and report.reviews.quarantined == 1 and report.interactions == 40
    assert "  1 reviews dated outside ingest.min_review_date .. now + ingest.max_days_ahead (quarantined)" \
        in report.lines()
    assert report.reviews.first_problems[0].startswith(f"line 41: unixReviewTime: {T0 * 1000} is after ")


def test_images_no_longer_referenced_are_removed(tmp_path):
    catalog = _catalog_with_images(tmp_path, 3)
    paths = CatalogPaths.of("t", tmp_path / "data")
    run_ingest("t", catalog, IngestParams(), paths, root=tmp_path, policy=FAST)
    first = {p.name for p in paths.images_dir.rglob("*.png")}
    meta = tmp_path / "src" / "meta.json"  # item I0 now points at another file
    meta.write_text(meta.read_text().replace('"images/0.png"', '"images/2.png"'))
    summary = run_ingest("t", catalog, IngestParams(), paths, root=tmp_path, policy=FAST)
    stored = {p.relative_to(paths.root).as_posix() for p in paths.images_dir.rglob("*") if p.is_file()}
    assert stored == {p for p in pq.read_table(paths.images_table)["path"].to_pylist() if p}
    assert len(stored) == 3 and len(first - {p.rsplit("/", 1)[-1] for p in stored}) == 1
    assert "1 stored images no longer referenced were removed" in summary.notes
