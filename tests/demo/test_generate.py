"""The demo catalog generator: formats, determinism, planted defects and planted signal."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from cammsr.core.config import DemoParams
from demo.generate import META_FILE, REVIEWS_FILE, DemoSummary, generate_demo, main

SMALL = DemoParams(n_users=60, n_items=48, n_categories=3, mean_length=8.0, image_size=32, seed=3)


def _lines(path: Path) -> list[str]:
    return gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()


def _reviews(out: Path) -> list[dict]:
    """Valid review records in file order (the planted malformed line skipped)."""
    records = []
    for line in _lines(out / REVIEWS_FILE):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _meta(out: Path) -> dict[str, dict]:
    return {rec["asin"]: rec for rec in map(json.loads, _lines(out / META_FILE))}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSummary]:
    out = tmp_path_factory.mktemp("small") / "demo"
    return out, generate_demo(out, SMALL)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSummary]:
    out = tmp_path_factory.mktemp("default") / "demo"
    return out, generate_demo(out, DemoParams())


def test_same_params_give_byte_identical_files(small, tmp_path):
    out, _ = small
    again = generate_demo(tmp_path / "again", SMALL)
    assert again.malformed_line == small[1].malformed_line
    assert _files(tmp_path / "again") == _files(out)
    other = generate_demo(tmp_path / "other", SMALL.model_copy(update={"seed": 4}))
    assert (tmp_path / "other" / REVIEWS_FILE).read_bytes() != (out / REVIEWS_FILE).read_bytes()
    assert other.n_users == SMALL.n_users


def test_gzip_header_has_no_name_and_no_mtime(small):
    out, _ = small
    for name in (REVIEWS_FILE, META_FILE):
        head = (out / name).read_bytes()[:10]
        assert head[:3] == b"\x1f\x8b\x08"
        assert head[3] & 0x08 == 0  # FNAME flag unset
        assert head[4:8] == b"\0\0\0\0"  # mtime 0


def test_reviews_are_json_lines_except_exactly_the_planted_one(small):
    out, summary = small
    lines = _lines(out / REVIEWS_FILE)
    assert len(lines) == summary.n_review_lines == summary.n_reviews + 2
    bad = []
    for n, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        assert isinstance(rec["overall"], float) and 1.0 <= rec["overall"] <= 5.0
        assert isinstance(rec["unixReviewTime"], int) and rec["unixReviewTime"] % 86400 == 0
        day = dt.datetime.fromtimestamp(rec["unixReviewTime"], tz=dt.UTC)
        assert rec["reviewTime"] == day.strftime("%m %d, %Y")
        assert rec["reviewerID"].startswith("A") and len(rec["asin"]) == 10
        assert rec["reviewText"] and rec["summary"]
    assert bad == [summary.malformed_line]
    assert 1 < summary.malformed_line < len(lines)
    # a writer that died mid-line and wrote the line again: the stub is a prefix of the next line
    stub, full = lines[summary.malformed_line - 1], lines[summary.malformed_line]
    assert full.startswith(stub) and len(stub) < len(full)


def test_meta_lines_have_the_amazon_shape(small):
    out, summary = small
    meta = _meta(out)
    assert len(meta) == summary.n_meta_lines == SMALL.n_items - 1
    labels = set()
    for rec in meta.values():
        assert isinstance(rec["title"], str) and isinstance(rec["description"], str) and rec["brand"]
        (path,) = rec["categories"]
        assert len(path) == 3 and path[0] == "Demo Store"
        labels.add(path[1])
        assert isinstance(rec["price"], float)
        assert rec["imUrl"].startswith("images/") and rec["imageURLHighRes"] == [rec["imUrl"]]
    assert labels == {"Puzzles", "Dolls", "Vehicles"}


def test_exactly_one_of_each_planted_defect(small):
    out, s = small
    meta = _meta(out)
    reviewed = Counter(rec["asin"] for rec in _reviews(out))
    assert len({s.missing_meta_item, s.missing_image_item, s.corrupt_image_item}) == 3
    # (2) reviewed but no metadata
    assert s.missing_meta_item in reviewed and s.missing_meta_item not in meta
    assert set(reviewed) - set(meta) == {s.missing_meta_item}
    # (3) metadata points at an image file that is not there
    assert not (out / meta[s.missing_image_item]["imUrl"]).exists()
    # (4) the corrupt image opens (header intact) but cannot be decoded
    corrupt = out / meta[s.corrupt_image_item]["imUrl"]
    assert corrupt.suffix == ".jpg" and corrupt.stat().st_size > 0
    with Image.open(corrupt) as img, pytest.raises(OSError, match="truncated"):
        img.load()
    # (5) one exact duplicate, right after its original
    lines = _lines(out / REVIEWS_FILE)
    assert s.duplicate_line == s.duplicate_of_line + 1
    assert lines[s.duplicate_line - 1] == lines[s.duplicate_of_line - 1]
    dup = json.loads(lines[s.duplicate_line - 1])
    assert (dup["reviewerID"], dup["asin"]) == (s.duplicate_user, s.duplicate_item)
    keys = Counter((r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in _reviews(out))
    repeated = [k for k, n in keys.items() if n > 1]
    assert repeated == [(s.duplicate_user, s.duplicate_item, dup["unixReviewTime"])]
    assert len(set(lines)) == len(lines) - 1


def test_images_decode_at_size_in_both_formats(small):
    out, s = small
    meta = _meta(out)
    files = sorted((out / "images").iterdir())
    assert len(files) == s.n_images == SMALL.n_items - 2
    formats = Counter()
    for asin, rec in meta.items():
        if asin in (s.missing_image_item, s.corrupt_image_item):
            continue
        with Image.open(out / rec["imUrl"]) as img:
            img.load()
            assert img.size == (SMALL.image_size, SMALL.image_size)
            formats[img.format] += 1
    assert formats["PNG"] == s.n_png > 0 and formats["JPEG"] > 0


def test_each_users_timestamps_never_decrease_and_some_share_a_day(small):
    out, _ = small
    times: dict[str, list[int]] = defaultdict(list)
    for rec in _reviews(out):
        times[rec["reviewerID"]].append(rec["unixReviewTime"])
    assert len(times) == SMALL.n_users
    assert all(t == sorted(t) for t in times.values())
    assert min(len(t) for t in times.values()) >= 5
    assert sum(len(t) != len(set(t)) for t in times.values()) > SMALL.n_users // 4


def test_image_base_url_makes_urls_absolute(small, tmp_path):
    out, _ = small
    generate_demo(tmp_path / "abs", SMALL, image_base_url="http://127.0.0.1:8000/demo")
    for rec in _meta(tmp_path / "abs").values():
        assert rec["imUrl"].startswith("http://127.0.0.1:8000/demo/images/")
        assert rec["imageURLHighRes"] == [rec["imUrl"]]
    assert (tmp_path / "abs" / REVIEWS_FILE).read_bytes() == (out / REVIEWS_FILE).read_bytes()


def test_planted_signal_next_item_follows_category_and_style(default):
    """Consecutive items share (category, style) about 70% of the time; chance is about 1/24."""
    out, s = default
    group = {asin: tuple(rec["categories"][0][1:]) for asin, rec in _meta(out).items()}
    seqs: dict[str, list[str]] = defaultdict(list)
    for rec in _reviews(out):
        seqs[rec["reviewerID"]].append(rec["asin"])
    pairs = [(group[a], group[b]) for seq in seqs.values() for a, b in zip(seq, seq[1:], strict=False)
             if a in group and b in group and a != b]  # fmt: skip
    same = sum(a == b for a, b in pairs) / len(pairs)
    share = Counter(group[a] for seq in seqs.values() for a in seq if a in group)
    total = sum(share.values())
    chance = sum((n / total) ** 2 for n in share.values())
    assert len(share) == 6 * 4
    assert 0.6 < same < 0.8 and chance < 0.1
    assert abs(same - s.same_group_fraction) < 0.02


def test_default_catalog_survives_a_five_core(default):
    out, s = default
    pairs = {(r["reviewerID"], r["asin"]) for r in _reviews(out)}
    assert len(pairs) == s.n_reviews
    while True:
        users, items = Counter(u for u, _ in pairs), Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if users[u] >= 5 and items[i] >= 5}
        if kept == pairs:
            break
        pairs = kept
    assert len({u for u, _ in pairs}) >= 0.95 * s.n_users
    assert len({i for _, i in pairs}) >= 0.95 * s.n_items
    # the long tail: a good share of items is rare, which is where content features help
    counts = Counter(r["asin"] for r in _reviews(out))
    assert sum(n < 10 for n in counts.values()) >= 0.1 * s.n_items
    assert max(counts.values()) > 5 * sorted(counts.values())[len(counts) // 2]


def test_cli_reads_params_and_replaces_the_folder(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(
        "catalogs:\n  demo:\n    reviews: file:x.json.gz\n"
        "demo:\n  n_users: 20\n  n_items: 30\n  n_categories: 2\n  mean_length: 6.0\n  image_size: 16\n"
    )
    out = tmp_path / "src" / "demo"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older run")
    monkeypatch.chdir(tmp_path)
    summary = main(["--out", str(out), "--params", str(params)])
    assert (summary.n_users, summary.n_items, summary.n_categories) == (20, 30, 2)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["demo_summary.json", "images", META_FILE, REVIEWS_FILE]
    assert [p.name for p in (tmp_path / "src").iterdir()] == ["demo"]  # no temp folder left behind
    recorded = json.loads((out / "demo_summary.json").read_text())
    assert recorded["malformed_line"] == summary.malformed_line and "seconds" not in recorded


def test_long_tail_regime_late_items_only_at_the_last_two_reviews():
    import numpy as np

    from cammsr.core.config import DemoParams
    from demo.sequences import make_items, make_users

    params = DemoParams(n_users=300, n_items=200, popularity_exponent=1.0, late_item_share=0.1)
    rng_items, rng_users = (np.random.default_rng(s) for s in np.random.SeedSequence(3).spawn(2))
    items = make_items(rng_items, params.n_items, params.n_categories, params.popularity_exponent,
                       params.late_item_share)
    users = make_users(rng_users, items, params.n_users, params.n_categories, params.mean_length)
    assert sum(it.late for it in items) == 20
    late_at = [pos - len(u.events) for u in users for pos, (i, _) in enumerate(u.events) if items[i].late]
    assert late_at and set(late_at) <= {-2, -1}  # never in the training part of a sequence
    prev_group = [(items[u.events[p - 1][0]].category, items[u.events[p - 1][0]].style, items[i].category)
                  for u in users for p, (i, _) in enumerate(u.events) if items[i].late]
    assert all(c == ci for c, _, ci in prev_group)  # a late launch follows an item of its own category
    # without late items no random draw is added: the dense regime's catalog is unchanged
    again = make_items(np.random.default_rng(np.random.SeedSequence(3).spawn(2)[0]), 200, 6, 1.0, 0.0)
    dense = make_items(np.random.default_rng(np.random.SeedSequence(3).spawn(2)[0]), 200, 6, 1.0)
    assert again == dense and not any(it.late for it in dense)
