"""Property tests and a bounded fuzz of the record parsers: random and hostile lines never crash them, and
every line is accounted for: parsed, or quarantined with its own line number (nothing lost, nothing twice)."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cammsr.ingest.formats import (
    _PARSERS,
    MAX_LINE_BYTES,
    Format,
    ItemMeta,
    RecordError,
    Review,
    SourceReader,
    TimestampWindow,
    decode_record,
    iter_lines,
)
from cammsr.ingest.quarantine import Quarantine

PROFILE = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

KEYS = ["reviewerID", "asin", "unixReviewTime", "reviewTime", "overall", "user_id", "parent_asin", "timestamp",
        "rating", "title", "description", "brand", "categories", "category", "imUrl", "imageURL",
        "imageURLHighRes", "images", "store", "main_category", "hi_res", "large", "vote", "style"]
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", " ", "1e3", "09 13, 2009"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4), max_leaves=12)
records = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)


@PROFILE
@given(records, st.sampled_from(sorted(_PARSERS, key=str)))
def test_a_parser_returns_a_record_or_raises_record_error(record, key):
    try:
        parsed = _PARSERS[key](record)
    except RecordError:
        return
    assert isinstance(parsed, Review | ItemMeta)
    if isinstance(parsed, Review):
        assert parsed.user_id.strip() and parsed.item_id.strip() and isinstance(parsed.timestamp, int)
        assert parsed.rating is None or parsed.rating == parsed.rating  # not NaN
    else:
        assert all(isinstance(c, str) and c for c in parsed.categories)


@FUZZ
@given(st.binary(max_size=300))
def test_decode_record_raises_only_record_error_on_any_bytes(raw):
    try:
        record = decode_record(raw)
    except RecordError:
        return
    assert isinstance(record, dict)


def nested(depth: int, kind: str) -> str:
    return {"list": "[" * depth + "]" * depth, "dict": '{"a": ' * depth + "1" + "}" * depth,
            "literal": "{'a': " + "[" * depth + "]" * depth + "}"}[kind]


REVIEW = {"amazon-2018": lambda u, i, t: json.dumps({"reviewerID": u, "asin": i, "overall": 4, "unixReviewTime": t,
                                                     "verified": True}),
          "amazon-2014": lambda u, i, t: json.dumps({"reviewerID": u, "asin": i, "overall": 4, "unixReviewTime": t}),
          "amazon-2023": lambda u, i, t: json.dumps({"user_id": u, "parent_asin": i, "rating": 4,
                                                     "timestamp": t * 1000})}
hostile_lines = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
    st.text(max_size=60).map(lambda s: " ".join(s.splitlines()).encode("utf-8", "replace")),
    records.map(lambda r: json.dumps(r, default=str).encode()),
    st.builds(nested, st.sampled_from([50, 5000, 60000]), st.sampled_from(["list", "dict", "literal"]))
    .map(str.encode),
    st.just(b"[" + b"1," * 10 + b"1]"),
)


@st.composite
def review_files(draw):
    fmt = draw(st.sampled_from(sorted(REVIEW)))
    n_good = draw(st.integers(min_value=3, max_value=15))
    good = [REVIEW[fmt](f"u{k % 4}", f"i{k % 5}", 1_400_000_000 + k).encode() for k in range(n_good)]
    bad = draw(st.lists(hostile_lines, max_size=12))
    lines = good[:3] + bad + good[3:]  # three good ones first: the format is still detected
    order = draw(st.permutations(range(3, len(lines))))
    lines = lines[:3] + [lines[k] for k in order]
    return fmt, lines, draw(st.booleans())


@PROFILE
@given(review_files())
def test_every_line_is_parsed_or_quarantined_once_with_its_number(case):
    fmt, lines, gz = case
    data = b"\n".join(lines) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("r.json.gz" if gz else "r.json")
        path.write_bytes(gzip.compress(data) if gz else data)
        quarantine = Quarantine()
        reader = SourceReader(path, "reviews", quarantine, file="raw/r", progress=False,
                              timestamps=TimestampWindow.from_params())
        parsed = list(reader)
        numbers = [n for n, _ in iter_lines(path)]
    assert (reader.format is Format.AMAZON_2023) == (fmt == "amazon-2023")  # a stray record does not flip it
    quarantined = [r.line for r in quarantine.records]
    assert len(parsed) + len(quarantined) == len(numbers) == reader.lines
    assert len(set(quarantined)) == len(quarantined) and set(quarantined) <= set(numbers)
    assert all(isinstance(r, Review) for r in parsed) and len(parsed) >= 3


def test_a_line_longer_than_the_limit_is_quarantined_and_the_next_line_read(tmp_path):
    ok = REVIEW["amazon-2018"]("u", "i", 1_400_000_000)
    path = tmp_path / "r.json"
    with open(path, "w") as fh:
        fh.write(ok + "\n" + ok + "\n")
        fh.write('{"reviewerID": "' + "x" * (MAX_LINE_BYTES + 10) + '"}\n')
        fh.write(REVIEW["amazon-2018"]("v", "j", 1_400_000_001) + "\n")
    quarantine = Quarantine()
    parsed = list(SourceReader(path, "reviews", quarantine, progress=False))
    assert [r.user_id for r in parsed] == ["u", "u", "v"]
    assert [(r.line, r.reason) for r in quarantine.records] == [(3, f"line longer than {MAX_LINE_BYTES:,} bytes")]
    assert len(quarantine.records[0].raw) <= 500
