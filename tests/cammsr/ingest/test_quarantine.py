"""cammsr/ingest/quarantine.py: records with file, line and reason; counts per file; the fraction ceiling."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from cammsr.ingest.quarantine import Quarantine, QuarantineLimitError, QuarantineRecord, check_fraction


def test_in_memory_records_keep_file_line_reason_and_a_bounded_raw():
    q = Quarantine(raw_chars=4)
    q.add("raw/a.json.gz", 2, "missing asin", b'{"x": 1}')
    q.add("raw/a.json.gz", 9, "not UTF-8", b"ab\xffcdef")
    q.add("raw/b.json", 1, "expected an object, found list", "[1, 2]")
    assert q.records == [
        QuarantineRecord("raw/a.json.gz", 2, "missing asin", '{"x"'),
        QuarantineRecord("raw/a.json.gz", 9, "not UTF-8", "ab\ufffdc"),  # undecodable bytes kept visible
        QuarantineRecord("raw/b.json", 1, "expected an object, found list", "[1, "),
    ]
    assert q.counts == Counter({"raw/a.json.gz": 2, "raw/b.json": 1}) and q.total == 3


def test_the_file_holds_one_json_object_per_record_after_close(tmp_path):
    target = tmp_path / "quarantine.jsonl"
    with Quarantine(target) as q:
        q.add("raw/r.json", 5, "missing reviewerID", '{"asin": "I1"}')
        q.add("raw/r.json", 7, "bad é time", "{…}")
        assert not target.exists() and q.records == []  # streamed to a temp file, not kept in memory
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"file": "raw/r.json", "line": 5, "reason": "missing reviewerID", "raw": '{"asin": "I1"}'},
        {"file": "raw/r.json", "line": 7, "reason": "bad é time", "raw": "{…}"},
    ]
    assert "é" in lines[1]  # ensure_ascii off: the file reads as the source did
    assert [p.name for p in tmp_path.iterdir()] == ["quarantine.jsonl"]


def test_the_file_is_put_in_place_even_when_the_stage_fails(tmp_path):
    target = tmp_path / "quarantine.jsonl"
    with pytest.raises(RuntimeError, match="stage failed"), Quarantine(target) as q:
        q.add("raw/r.json", 3, "truncated", "{")
        raise RuntimeError("stage failed")
    assert json.loads(target.read_text())["line"] == 3  # the user can look at what went wrong


def test_an_empty_quarantine_still_writes_an_empty_file(tmp_path):
    target = tmp_path / "quarantine.jsonl"
    with Quarantine(target):
        pass
    assert target.read_bytes() == b""  # a declared DVC output exists even on a clean run


def test_adding_to_a_closed_file_quarantine_is_an_error(tmp_path):
    q = Quarantine(tmp_path / "q.jsonl")
    with pytest.raises(RuntimeError, match="not open"):
        q.add("f", 1, "r", "x")


def test_only_the_first_three_per_file_are_logged(caplog):
    q = Quarantine()
    with caplog.at_level(logging.WARNING, logger="cammsr.ingest.quarantine"):
        for line in range(1, 6):
            q.add("raw/a", line, f"reason {line}", "x")
        q.add("raw/b", 1, "other file", "x")
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["quarantined raw/a:1: reason 1", "quarantined raw/a:2: reason 2",
                      "quarantined raw/a:3: reason 3", "quarantined raw/b:1: other file"]
    assert q.counts["raw/a"] == 5 and len(q.records) == 6  # all recorded, only the logging is bounded


def test_fraction_at_the_ceiling_passes_and_above_it_names_the_file_and_the_quarantine():
    check_fraction({"raw/a": 1}, {"raw/a": 100}, 0.01, "q.jsonl")  # 1% is not more than 1%
    check_fraction({}, {"raw/a": 10, "raw/empty": 0}, 0.0, "q.jsonl")  # no bad lines, and 0 records: no division
    with pytest.raises(QuarantineLimitError) as err:
        check_fraction(Counter({"raw/a": 1, "raw/b": 3}), {"raw/a": 100, "raw/b": 200}, 0.01, "data/x/quarantine.jsonl")
    assert str(err.value) == (
        "raw/b: 3 of 200 records quarantined (1.50%), more than ingest.max_quarantine_fraction=0.01; "
        "see data/x/quarantine.jsonl for each line and reason"
    )


def test_every_record_bad_fails_even_with_a_generous_ceiling():
    with pytest.raises(QuarantineLimitError, match=r"raw/junk: 2 of 2 records quarantined \(100\.00%\)"):
        check_fraction({"raw/junk": 2}, {"raw/junk": 2}, 0.99, "q.jsonl")
