"""cammsr/formats.py: the three Amazon formats parse to the same records; bad lines are quarantined."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from cammsr.ingest.formats import (
    Format,
    FormatError,
    ItemMeta,
    Review,
    SourceReader,
    decode_record,
    detect_format,
    iter_lines,
    read_meta,
    read_reviews,
)
from cammsr.ingest.quarantine import Quarantine

# One logical catalog: (user, item, unix seconds, rating) and item metadata.
REVIEWS = [
    ("U1", "I1", 1_400_000_000, 5.0),
    ("U2", "I1", 1_400_086_400, 3.0),
    ("U1", "I2", 1_400_086_400, 4.0),
]
ITEMS = [
    ItemMeta("I1", "Red Puzzle", "A puzzle. Red.", "Acme", ("Toys & Games", "Puzzles"), "http://img/I1-hi.jpg"),
    ItemMeta("I2", "Blue Ball", None, None, ("Sports",), None),
]
EXPECTED_REVIEWS = [Review(u, i, t, r) for u, i, t, r in REVIEWS]


def _write(path: Path, lines: list[str], gz: bool) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_2014(d: Path) -> tuple[Path, Path]:
    reviews = [json.dumps({"reviewerID": u, "asin": i, "reviewerName": "x", "helpful": [0, 0],
                           "reviewText": "t", "overall": r, "summary": "s", "unixReviewTime": t,
                           "reviewTime": "01 01, 2014"}) for u, i, t, r in REVIEWS]
    meta = [  # Python literals, as the 2014 dumps have them
        repr({"asin": "I1", "title": "Red Puzzle", "description": "A puzzle. Red.", "brand": "Acme",
              "categories": [["Toys &amp; Games", "Puzzles"], ["Other"]], "salesRank": {"Toys": 3},
              "imUrl": "http://img/I1-hi.jpg"}),
        repr({"asin": "I2", "title": "Blue Ball", "categories": [["Sports"]]}),
    ]
    return _write(d / "reviews_T_5.json.gz", reviews, True), _write(d / "meta_T.json.gz", meta, True)


def write_2018(d: Path) -> tuple[Path, Path]:
    reviews = [json.dumps({"overall": r, "verified": True, "reviewTime": "x", "reviewerID": u, "asin": i,
                           "style": {"Size:": "L"}, "unixReviewTime": t, "vote": "2"})
               for u, i, t, r in REVIEWS]
    meta = [
        json.dumps({"asin": "I1", "title": "Red Puzzle", "description": ["A puzzle.", "Red."],
                    "brand": "Acme", "category": ["Toys &amp; Games", "Puzzles"], "main_cat": "Toys",
                    "imageURL": ["http://img/I1-lo.jpg"], "imageURLHighRes": ["http://img/I1-hi.jpg"]}),
        json.dumps({"asin": "I2", "title": "Blue Ball", "description": [], "brand": "",
                    "category": ["Sports"], "imageURL": [], "imageURLHighRes": []}),
    ]
    return _write(d / "Toys_5.json", reviews, False), _write(d / "meta_Toys.json.gz", meta, True)


def write_2023(d: Path) -> tuple[Path, Path]:
    reviews = [json.dumps({"rating": r, "title": "s", "text": "t", "images": [], "asin": f"{i}-variant",
                           "parent_asin": i, "user_id": u, "timestamp": t * 1000 + 999,
                           "helpful_vote": 0, "verified_purchase": True}) for u, i, t, r in REVIEWS]
    meta = [
        json.dumps({"main_category": "Toys", "title": "Red Puzzle", "average_rating": 4.5,
                    "features": [], "description": ["A puzzle.", "Red."], "price": None,
                    "images": [{"thumb": "http://img/I1-th.jpg", "large": "http://img/I1-lo.jpg",
                                "variant": "MAIN", "hi_res": "http://img/I1-hi.jpg"}],
                    "store": "Acme", "categories": ["Toys & Games", "Puzzles"], "parent_asin": "I1"}),
        json.dumps({"main_category": "Sports", "title": "Blue Ball", "description": [], "images": [],
                    "store": None, "categories": [], "parent_asin": "I2"}),
    ]
    return _write(d / "Toys.jsonl.gz", reviews, True), _write(d / "meta_Toys.jsonl", meta, False)


@pytest.mark.parametrize(
    ("writer", "fmt"),
    [(write_2014, Format.AMAZON_2014), (write_2018, Format.AMAZON_2018), (write_2023, Format.AMAZON_2023)],
)
def test_three_formats_parse_to_the_same_records(tmp_path: Path, writer, fmt: Format) -> None:
    reviews_path, meta_path = writer(tmp_path)
    q = Quarantine()
    assert detect_format(reviews_path, "reviews") == fmt
    assert detect_format(meta_path, "meta") == fmt
    assert list(read_reviews(reviews_path, q)) == EXPECTED_REVIEWS
    assert list(read_meta(meta_path, q)) == ITEMS
    assert q.total == 0


def test_gzip_is_told_by_magic_bytes_not_by_name(tmp_path: Path) -> None:
    plain_named_gz = _write(tmp_path / "reviews.json.gz", ['{"a": 1}', "", '{"b": 2}'], gz=False)
    gz_named_plain = _write(tmp_path / "reviews.json", ['{"a": 1}'], gz=True)
    assert [n for n, _ in iter_lines(plain_named_gz)] == [1, 3]  # blank line 2 skipped, numbering kept
    assert list(iter_lines(gz_named_plain)) == [(1, b'{"a": 1}')]


def test_malformed_lines_are_quarantined_with_their_line_numbers(tmp_path: Path) -> None:
    ok = json.dumps({"reviewerID": "U1", "asin": "I1", "unixReviewTime": 10, "overall": 5.0})
    lines = [
        ok,                                                                     # 1
        '{"reviewerID": "U2", "asin": "I1", "unixRevi',                         # 2 truncated
        "",                                                                     # 3 blank: not a record
        json.dumps({"asin": "I1", "unixReviewTime": 10}),                       # 4 no user
        json.dumps({"reviewerID": "U3", "asin": "I2", "unixReviewTime": 20}),   # 5 ok, no rating
        "[1, 2]",                                                               # 6 not an object
        json.dumps({"reviewerID": "U4", "asin": "I2", "unixReviewTime": "soon"}),  # 7 bad time
        json.dumps({"reviewerID": "U5", "asin": "I2", "overall": 4}),           # 8 no time
        json.dumps({"reviewerID": "U6", "asin": "I3", "unixReviewTime": 1, "overall": "great"}),  # 9
    ]
    path = _write(tmp_path / "r.json", lines, gz=False)
    data = path.read_bytes().replace(b'"U5"', b'"U\xff5"')  # line 8 is now not UTF-8 either
    path.write_bytes(data)
    q = Quarantine()
    reader = SourceReader(path, "reviews", q, file="raw/r.json")
    assert list(reader) == [Review("U1", "I1", 10, 5.0), Review("U3", "I2", 20, None)]
    assert reader.lines == 8
    got = [(r.file, r.line) for r in q.records]
    assert got == [("raw/r.json", n) for n in (2, 4, 6, 7, 8, 9)]
    reasons = {r.line: r.reason for r in q.records}
    assert "neither JSON nor a Python literal" in reasons[2]
    assert reasons[4] == "missing reviewerID"
    assert reasons[6] == "expected an object, found a JSON array: expected JSON Lines, one object per line"
    assert "unixReviewTime: expected an integer" in reasons[7]
    assert "not UTF-8" in reasons[8]
    assert "overall: expected a number" in reasons[9]
    assert q.records[0].raw == lines[1] and q.counts == {"raw/r.json": 6}


def test_quarantine_streams_to_jsonl(tmp_path: Path) -> None:
    target = tmp_path / "quarantine.jsonl"
    with Quarantine(target, raw_chars=5) as q:
        q.add("raw/x", 3, "missing asin", b"0123456789")
        assert not target.exists()  # renamed into place on close only
    expected = {"file": "raw/x", "line": 3, "reason": "missing asin", "raw": "01234"}
    assert json.loads(target.read_text()) == expected


def test_python_literal_lines_and_2023_variants() -> None:
    record = decode_record(b"{'asin': 'X', 'price': 1.5, 'related': {'also': ['Y']}, 'n': None}")
    assert record == {"asin": "X", "price": 1.5, "related": {"also": ["Y"]}, "n": None}
    with pytest.raises(ValueError, match="neither JSON"):
        decode_record(b"{'asin': __import__('os')}")  # literal_eval, never eval


def test_2023_image_dict_of_lists_and_main_category_fallback(tmp_path: Path) -> None:
    meta = _write(tmp_path / "m.jsonl", [json.dumps({
        "parent_asin": "P", "main_category": "All Beauty", "categories": [], "description": "plain text",
        "images": {"hi_res": [None, "h2"], "large": ["l1"], "thumb": ["t1"]}})], gz=False)
    [item] = read_meta(meta, Quarantine())
    assert item == ItemMeta("P", None, "plain text", None, ("All Beauty",), "h2")


def test_swapped_files_name_the_file(tmp_path: Path) -> None:
    reviews, meta = write_2018(tmp_path)
    with pytest.raises(FormatError, match=r"meta_Toys\.json\.gz.*looks like a metadata file"):
        detect_format(meta, "reviews")
    with pytest.raises(FormatError, match="looks like a reviews file"):
        detect_format(reviews, "meta")


def test_a_file_with_no_valid_record_is_quarantined_line_by_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "junk.json", ["not json", "{also not"], gz=False)
    q = Quarantine()
    reader = SourceReader(path, "reviews", q)
    assert reader.format is None and list(reader) == [] and [r.line for r in q.records] == [1, 2]
