"""cammsr/ops/source_check.py: what `cammsr onboard` learns from a catalog's files, and the errors it stops on.

One small catalog, written here in each Amazon format, with every count worked out by hand:

    reviews  U1: I1 (day 0, 5.0), I2 (day 1, 4.0), I3 (day 2, no rating)
             U2: I1 (day 1, 3.0), I2 (day 3, 2.0)
             U3: I4 (day 3, 1.0)                      -> 6 interactions, 3 users, 4 items, 5 rated
    meta     I1 everything; I2 title + ["Sports"]; I3 title + brand; I9 (nobody reviewed it); I1 again
             -> 3 reviewed items described (I4 is not): title 3, description 1, brand 2, categories 2, image 1
             -> labels at level 1: Puzzles, Sports, unknown (I3 has no category path) = 3
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from cammsr.ingest.download import RetryPolicy, raw_name
from cammsr.ops.source_check import SourceError, check_source

FAST = RetryPolicy(retries=0, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.02)
T0, DAY = 1_400_000_000, 86_400  # 2014-05-13 (UTC)
REVIEWS = [("U1", "I1", 0, 5.0), ("U1", "I2", 1, 4.0), ("U1", "I3", 2, None), ("U2", "I1", 1, 3.0),
           ("U2", "I2", 3, 2.0), ("U3", "I4", 3, 1.0)]
ITEMS = [  # (asin, title, description, brand, category path, image)
    ("I1", "Red Puzzle", "A puzzle.", "Acme", ["Toys & Games", "Puzzles"], "http://img/I1.jpg"),
    ("I2", "Ball", None, None, ["Sports"], None),
    ("I3", "Kite", None, "Skyco", [], None),
    ("I9", "Unreviewed", "Nobody bought it.", "Acme", ["Toys & Games", "Kites"], "http://img/I9.jpg"),
    ("I1", "A later duplicate record", None, None, [], None),
]


def _review_2014(u, i, d, r):
    rec = {"reviewerID": u, "asin": i, "helpful": [0, 0], "reviewText": "t", "unixReviewTime": T0 + d * DAY}
    return json.dumps(rec | ({"overall": r} if r is not None else {}))


def _meta_2014(a, t, desc, b, cats, img):
    rec = {"asin": a, "title": t, "categories": [cats] if cats else []}
    rec |= {k: v for k, v in (("description", desc), ("brand", b), ("imUrl", img)) if v}
    return repr(rec)  # the 2014 dumps are Python literals


def _review_2018(u, i, d, r):
    return json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": T0 + d * DAY, "verified": True,
                       "vote": "1"})


def _meta_2018(a, t, desc, b, cats, img):
    return json.dumps({"asin": a, "title": t, "description": [desc] if desc else [], "brand": b or "",
                       "category": cats, "imageURLHighRes": [img] if img else [], "imageURL": []})


def _review_2023(u, i, d, r):
    return json.dumps({"user_id": u, "parent_asin": i, "asin": i + "-v", "rating": r,
                       "timestamp": (T0 + d * DAY) * 1000 + 500})  # milliseconds


def _meta_2023(a, t, desc, b, cats, img):
    return json.dumps({"parent_asin": a, "title": t, "description": [desc] if desc else [], "store": b,
                       "categories": cats, "images": [{"hi_res": img, "large": None}] if img else []})


FORMATS = {
    "amazon-2014": (_review_2014, _meta_2014, "reviews_T_5.json.gz", "meta_T.json.gz"),
    "amazon-2018": (_review_2018, _meta_2018, "T_5.json", "meta_T.json.gz"),
    "amazon-2023": (_review_2023, _meta_2023, "T.jsonl.gz", "meta_T.jsonl"),
}


def _write(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_catalog(root: Path, fmt: str, extra_review_lines: tuple[str, ...] = ()) -> tuple[str, str]:
    """The catalog above in ``fmt`` under ``root/src``; returns file: URLs relative to ``root``."""
    review, meta, reviews_name, meta_name = FORMATS[fmt]
    lines = [review(*r) for r in REVIEWS]
    lines[2:2] = extra_review_lines  # after two good records: detection still sees the format
    _write(root / "src" / reviews_name, lines)
    _write(root / "src" / meta_name, [meta(*m) for m in ITEMS])
    return f"file:src/{reviews_name}", f"file:src/{meta_name}"


def check(root: Path, reviews: str, meta: str | None, **kw):
    """`check_source` with a 1-core by default: the catalog's 6 reviews are too few for the 5-core."""
    kw.setdefault("user_core", 1)
    return check_source(reviews, meta, root / "raw", policy=FAST, root=root, **kw)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_is_detected_and_gives_the_same_counts(tmp_path, fmt):
    reviews, meta = write_catalog(tmp_path, fmt)
    report = check(tmp_path, reviews, meta, user_core=3, item_core=1)

    assert (report.reviews.format, report.meta.format) == (fmt, fmt)
    assert (report.reviews.url, report.meta.url) == (reviews, meta)
    assert (report.reviews.gzip, report.meta.gzip) == (reviews.endswith(".gz"), meta.endswith(".gz"))
    assert (report.reviews.records, report.meta.records) == (6, 5)
    assert (report.reviews.quarantined, report.meta.quarantined) == (0, 0)
    assert (report.interactions, report.users, report.items, report.rated) == (6, 3, 4, 5)
    assert (report.users_at_core, report.user_core) == (1, 3)  # only U1 has 3 interactions
    assert (report.first_day, report.last_day) == ("2014-05-13", "2014-05-16")
    assert report.described == 3
    assert report.fields == {"title": 3, "description": 1, "brand": 2, "categories": 2, "image_url": 1}
    assert report.categories == 3
    assert report.examples["categories"] == "Toys & Games > Puzzles" and report.examples["title"] == "Red Puzzle"
    assert report.modalities() == {"id": "yes: 4 items",
                                   "text": "yes: from title 3, description 1, brand 2, categories 2 of 4 items",
                                   "image": "yes: 1 of 4 items have an image URL"}
    # the files land where ingest looks for them, with its manifest, and nothing else
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        ["manifest.json", raw_name(reviews), raw_name(meta)])


def test_keys_and_the_report_text(tmp_path):
    reviews, meta = write_catalog(tmp_path, "amazon-2023")
    report = check(tmp_path, reviews, meta)
    assert report.reviews.keys == ["asin", "parent_asin", "rating", "timestamp", "user_id"]
    assert report.meta.keys == ["categories", "description", "images", "parent_asin", "store", "title"]
    lines = report.lines()
    size = (tmp_path / "src" / "T.jsonl.gz").stat().st_size
    assert lines[:3] == [f"reviews: {reviews}", f"  {size:,} bytes (gzip), format amazon-2023, 6 records",
                         "  keys: asin, parent_asin, rating, timestamp, user_id"]
    assert lines[3] == "  6 interactions, 3 users, 4 items, 5 rated, 2014-05-13 .. 2014-05-16; " \
                       "3 users have >= 1 interactions"
    assert lines[4] == "  split: 1/1-core keeps 6 interactions, 3 users (1 with a test target), 4 items"
    assert "  3 of 4 reviewed items described, 3 categories at ingest.category_level" in lines
    assert "  image_url     25.0%  e.g. 'http://img/I1.jpg'" in lines
    assert "  title         75.0%  e.g. 'Red Puzzle'" in lines


def test_without_metadata_or_images_the_modalities_say_why(tmp_path):
    reviews, meta = write_catalog(tmp_path, "amazon-2018")
    bare = check(tmp_path, reviews, None)
    assert bare.meta is None and bare.fields == {} and not bare.has_text and not bare.has_images
    assert bare.modalities() == {"id": "yes: 4 items",
                                 "text": "no: no item has a title, description, brand or category",
                                 "image": "no: no image URLs in the metadata"}
    assert "meta: none (items get no text and category 'unknown')" in bare.lines()
    no_images = check(tmp_path, reviews, meta, images=False)
    assert no_images.fields["image_url"] == 1 and not no_images.has_images
    assert no_images.modalities()["image"] == "no: --images no"


def test_malformed_lines_are_counted_and_shown_up_to_the_ceiling(tmp_path):
    reviews, meta = write_catalog(tmp_path, "amazon-2014", ('{"reviewerID": "U9", "asin": "I', "[1, 2]"))
    report = check(tmp_path, reviews, meta, max_quarantine_fraction=0.3)  # 2 of 8 = 25%
    assert (report.reviews.records, report.reviews.quarantined, report.interactions) == (8, 2, 6)
    assert report.reviews.first_problems[0].startswith("line 3: neither JSON nor a Python literal")
    array = "expected an object, found a JSON array: expected JSON Lines, one object per line"
    assert report.reviews.first_problems[1] == f"line 4: {array}"
    assert f"  malformed: line 4: {array}" in report.lines()
    with pytest.raises(SourceError) as err:
        check(tmp_path, reviews, meta, max_quarantine_fraction=0.2)
    assert str(err.value).startswith(f"{reviews}: 2 of 8 records malformed (25.00%), more than "
                                     "ingest.max_quarantine_fraction=0.2; first: line 3: neither JSON")


# ------------------------------------------------------------------------------------------------- errors


def _bad_reviews(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / name).write_bytes(data)
    return f"file:src/{name}"


@pytest.mark.parametrize(("name", "data", "message"), [
    ("r.json", b"", "empty file (0 bytes, no records): expected an Amazon reviews file"),
    ("r.json.gz", gzip.compress(b"\n  \n"), "empty file ({size} bytes, no records): expected an Amazon reviews file"),
    ("r.json", b"<html><body>Moved</body></html>\n", "no line is a JSON (or Python-literal) record, so this is not "
                                                     "an Amazon reviews file; it starts with b'<html><body>Moved"),
])
def test_unusable_files_are_errors_naming_the_url(tmp_path, name, data, message):
    url = _bad_reviews(tmp_path, name, data)
    with pytest.raises(SourceError) as err:
        check(tmp_path, url, None)
    assert str(err.value).startswith(f"{url}: " + message.format(size=len(data)))


def _many_reviews(n: int) -> bytes:
    """``n`` valid 2014 reviews of varied length (so that gzip cannot squeeze them into a few bytes)."""
    return "".join(_review_2014(f"U{k % 50}", f"I{k % 30}", k % 9, 5.0)[:-1] + f', "summary": "{"x" * (k % 97)}"}}\n'
                   for k in range(n)).encode()


@pytest.mark.parametrize("kind", ["reviews", "meta"])
@pytest.mark.parametrize("keep", [0.001, 0.5])  # cut inside the first record, or far past the ones detection reads
def test_a_gzip_cut_short_is_unreadable_not_a_crash(tmp_path, kind, keep):
    """Found while reading the records, a broken stream is still a SourceError naming the URL (was: EOFError)."""
    reviews, meta = write_catalog(tmp_path, "amazon-2014")
    whole = gzip.compress(_many_reviews(5000) if kind == "reviews" else
                          "".join(_meta_2014(f"I{k}", "t" * (k % 89), None, None, [], None) + "\n"
                                  for k in range(5000)).encode())
    target = tmp_path / "src" / ("reviews_T_5.json.gz" if kind == "reviews" else "meta_T.json.gz")
    target.write_bytes(whole[: max(20, int(len(whole) * keep))])
    url = reviews if kind == "reviews" else meta
    with pytest.raises(SourceError, match=rf"^{url}: line \d+: unreadable, gzip stream cut short \(Compressed file "
                                          r"ended before the end-of-stream"):
        check(tmp_path, reviews, meta, max_quarantine_fraction=1.0)


def test_swapped_files_say_which_is_which(tmp_path):
    reviews, meta = write_catalog(tmp_path, "amazon-2018")
    with pytest.raises(SourceError, match=r"^file:src/meta_T\.json\.gz: records have keys .*this looks like a "
                                          r"metadata file"):
        check(tmp_path, meta, reviews)
    with pytest.raises(SourceError, match=r"^file:src/T_5\.json: records have keys .*this looks like a reviews file"):
        check(tmp_path, reviews, reviews)  # the reviews file given as the metadata too


def test_no_valid_review_is_an_error_even_under_a_lenient_ceiling(tmp_path):
    lines = [json.dumps({"reviewerID": "U1", "asin": "I1"}), json.dumps({"reviewerID": "U2", "asin": "I2"})]
    url = _bad_reviews(tmp_path, "r.json", "".join(x + "\n" for x in lines).encode())
    with pytest.raises(SourceError, match=r"^file:src/r\.json: no valid review in 2 records$"):
        check(tmp_path, url, None, max_quarantine_fraction=1.0)


def test_unreachable_sources_name_the_url(tmp_path, httpserver: HTTPServer):
    with pytest.raises(SourceError, match=r"^file:src/nothere\.json: not reachable: no such file "):
        check(tmp_path, "file:src/nothere.json", None)
    httpserver.expect_request("/gone.json.gz").respond_with_data("not found", status=404)
    url = httpserver.url_for("/gone.json.gz")
    with pytest.raises(SourceError) as err:
        check(tmp_path, url, None)
    assert str(err.value).startswith(f"{url}: not reachable: HTTP 404")
