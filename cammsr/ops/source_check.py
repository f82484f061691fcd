"""Check a new catalog's source files before anything depends on them (``cammsr onboard``).

Fetches the reviews and metadata files exactly as ingest does (`cammsr.ingest.download`: same raw names and
manifest, so ingest later finds them unchanged), detects each file's Amazon format
(`cammsr.ingest.formats.detect_format`), parses every record once, and reports counts and a schema: which
fields the items have, how many items are described, which modalities the catalog can feed.

Anything that would make ingest fail is a `SourceError` naming the URL: unreachable (404, refused),
empty, not an Amazon reviews/metadata file (wrong format, or the two files swapped), too many
malformed lines (reviews dated outside ``ingest``'s window among them), no valid review. So is a catalog
the split could not use: the k-core filter is run here on the parsed reviews (`core_report`, what the split
stage will keep), and when it leaves no user with the three interactions leave-one-out needs, the error
gives the numbers and the largest k-core that would keep some (``cammsr onboard --min-interactions K``).
"""

from __future__ import annotations

import logging
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from cammsr.core.config import PrecomputedFeatures
from cammsr.core.errors import BadInput
from cammsr.data.kcore import kcore
from cammsr.ingest.download import DownloadError, FetchResult, RetryPolicy, download_sources
from cammsr.ingest.formats import (
    GZIP_MAGIC,
    CorruptFileError,
    FormatError,
    Kind,
    SourceReader,
    TimestampWindow,
    decode_record,
    iter_lines,
)
from cammsr.ingest.normalize import category_label
from cammsr.ingest.quarantine import Quarantine
from features.imported import FeatureFileError, read_features

log = logging.getLogger(__name__)

ITEM_FIELDS = ("title", "description", "brand", "categories", "image_url")
TEXT_FIELDS = ("title", "description", "brand", "categories")  # what features.text's template can use
SCHEMA_RECORDS = 20  # records whose keys make the schema line (as many as format detection reads)


MIN_SEQUENCE = 3  # leave-one-out: a user needs a training item, a valid and a test target


class SourceError(BadInput, ValueError):
    """A source file cannot be onboarded; the message names the URL and what is wrong."""


@dataclass(frozen=True)
class CoreReport:
    """What the split's k-core filter keeps of the catalog's interactions (exact duplicates dropped, as ingest)."""

    user_core: int
    item_core: int
    interactions: int
    users: int
    items: int
    test_users: int  # kept users with at least MIN_SEQUENCE interactions: they get a valid and a test target

    def line(self) -> str:
        return (f"{self.user_core}/{self.item_core}-core keeps {self.interactions:,} interactions, "
                f"{self.users:,} users ({self.test_users:,} with a test target), {self.items:,} items")


def core_report(pairs: pl.DataFrame, user_core: int, item_core: int) -> CoreReport:
    """Run the split's k-core on ``pairs`` (user_id, item_id, timestamp; duplicates already dropped)."""
    kept = kcore(pairs, user_core, item_core)
    per_user = kept.group_by("user_id").len()
    return CoreReport(user_core, item_core, kept.height, per_user.height, kept.get_column("item_id").n_unique(),
                      int((per_user.get_column("len") >= MIN_SEQUENCE).sum()))


def suggest_core(pairs: pl.DataFrame, below: int) -> CoreReport | None:
    """The largest k < ``below`` whose k-core gives some user a test target, or None when none does."""
    for k in range(below - 1, 0, -1):
        report = core_report(pairs, k, k)
        if report.test_users:
            return report
    return None


@dataclass
class FileReport:
    """One source file: where it came from, what it is, and how many of its records parse."""

    kind: Kind
    url: str
    bytes: int
    gzip: bool
    format: str
    keys: list[str]
    records: int = 0
    quarantined: int = 0
    first_problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        bad = f", {self.quarantined} malformed" if self.quarantined else ""
        out = [f"{self.kind}: {self.url}",
               f"  {self.bytes:,} bytes{' (gzip)' if self.gzip else ''}, format {self.format}, "
               f"{self.records:,} records{bad}",
               f"  keys: {', '.join(self.keys)}"]
        return out + [f"  malformed: {p}" for p in self.first_problems]


@dataclass
class FeatureReport:
    """A precomputed feature file of one modality, read and checked."""

    url: str
    format: str
    rows: int
    dim: int
    covered: int  # reviewed items that have a row

    def line(self, modality: str, items: int) -> str:
        return (f"{modality} features: {self.url}: {self.format}, {self.rows:,} rows x {self.dim}, "
                f"{self.covered:,} of {items:,} reviewed items covered")


@dataclass
class SourceReport:
    """What onboarding learned about a catalog's sources (printed, and put in the flow's artifact)."""

    reviews: FileReport
    meta: FileReport | None
    interactions: int
    users: int
    items: int
    users_at_core: int  # users with at least `user_core` interactions (k-core keeps at most these)
    user_core: int
    rated: int
    first_day: str
    last_day: str
    core: CoreReport | None = None  # what the split will keep
    out_of_window: int = 0  # reviews quarantined for a time outside ingest's window
    described: int = 0  # reviewed items that have a metadata record
    fields: dict[str, int] = field(default_factory=dict)  # reviewed items with a non-empty field
    examples: dict[str, str] = field(default_factory=dict)
    categories: int = 0  # distinct labels at ingest.category_level among described items
    images_wanted: bool = True
    features: dict[str, FeatureReport] = field(default_factory=dict)  # imported modalities

    @property
    def has_text(self) -> bool:
        return any(self.fields.get(f, 0) for f in TEXT_FIELDS)

    @property
    def has_images(self) -> bool:
        return self.images_wanted and self.fields.get("image_url", 0) > 0

    def modalities(self) -> dict[str, str]:
        """Each modality and why it is (not) available, e.g. ``{"image": "no: no image URLs in meta"}``."""
        text_from = [f"{f} {self.fields[f]:,}" for f in TEXT_FIELDS if self.fields.get(f, 0)]
        out = {"id": f"yes: {self.items:,} items"}
        out["text"] = f"yes: from {', '.join(text_from)} of {self.items:,} items" if text_from \
            else "no: no item has a title, description, brand or category"
        if not self.images_wanted:
            out["image"] = "no: --images no"
        elif self.has_images:
            out["image"] = f"yes: {self.fields['image_url']:,} of {self.items:,} items have an image URL"
        else:
            out["image"] = "no: no image URLs in the metadata"
        for modality, feat in self.features.items():  # imported features replace the encoder's input
            out[modality] = f"yes: imported {feat.dim}-d features for {feat.covered:,} of {self.items:,} items"
        return out

    def lines(self) -> list[str]:
        """The report as text lines (the CLI prints them, flows log them)."""
        out = [*self.reviews.lines()]
        out.append(f"  {self.interactions:,} interactions, {self.users:,} users, {self.items:,} items, "
                   f"{self.rated:,} rated, {self.first_day} .. {self.last_day}; "
                   f"{self.users_at_core:,} users have >= {self.user_core} interactions")
        if self.out_of_window:
            out.append(f"  {self.out_of_window:,} reviews dated outside ingest.min_review_date .. now + "
                       f"ingest.max_days_ahead (quarantined)")
        if self.core is not None:
            out.append(f"  split: {self.core.line()}")
        if self.meta is None:
            out.append("meta: none (items get no text and category 'unknown')")
        else:
            out += self.meta.lines()
            out.append(f"  {self.described:,} of {self.items:,} reviewed items described, "
                       f"{self.categories} categories at ingest.category_level")
        pct = {f: self.fields.get(f, 0) / max(self.items, 1) for f in ITEM_FIELDS}
        out.append("schema (share of reviewed items with the field):")
        for f in ITEM_FIELDS:
            example = f"  e.g. {self.examples[f]!r}" if f in self.examples else ""
            out.append(f"  {f:<12} {pct[f]:6.1%}{example}")
        out += [feat.line(m, self.items) for m, feat in self.features.items()]
        out.append("modalities: " + "; ".join(f"{m} {why}" for m, why in self.modalities().items()))
        return out


class _SampleQuarantine(Quarantine):
    """Counts every malformed record but keeps only the first few per file (a bad file must not fill memory)."""

    def add(self, file: str, line: int, reason: str, raw: bytes | str) -> None:
        if self.counts[file] < 3:
            super().add(file, line, reason, raw)
        else:
            self.counts[file] += 1


def _fail(url: str, what: str) -> SourceError:
    return SourceError(f"{url}: {what}")


UNREADABLE = (OSError, EOFError, zlib.error)  # a truncated or corrupt gzip stream


@contextmanager
def _readable(url: str) -> Iterator[None]:
    """Turn a gzip stream that breaks while it is read (cut short past its first records) into a SourceError."""
    try:
        yield
    except CorruptFileError as exc:  # names the URL and the line already
        raise SourceError(str(exc)) from exc
    except UNREADABLE as exc:
        raise _fail(url, f"unreadable ({exc})") from exc


def _file_report(result: FetchResult, kind: Kind, reader: SourceReader) -> FileReport:
    keys: set[str] = set()
    seen = 0
    for _, raw in iter_lines(result.path, result.entry.url):
        try:
            keys |= {str(k) for k in decode_record(raw)}
        except Exception:  # an undecodable record adds no keys, whatever it is
            continue
        seen += 1
        if seen >= SCHEMA_RECORDS:
            break
    with open(result.path, "rb") as fh:
        gzipped = fh.read(2) == GZIP_MAGIC
    return FileReport(kind, result.entry.url, result.entry.bytes, gzipped, str(reader.format), sorted(keys))


def _reader(result: FetchResult, kind: Kind, quarantine: Quarantine,
            timestamps: TimestampWindow | None = None) -> SourceReader:
    url = result.entry.url
    try:
        first = next((raw for _, raw in iter_lines(result.path, url)), None)
        reader = SourceReader(result.path, kind, quarantine, file=url, progress=False,
                              timestamps=timestamps) if first else None
    except (FormatError, CorruptFileError) as exc:  # they name the URL already
        raise SourceError(str(exc)) from exc
    except UNREADABLE as exc:
        raise _fail(url, f"unreadable ({exc})") from exc
    if reader is None:
        raise _fail(url, f"empty file ({result.entry.bytes} bytes, no records): expected an Amazon {kind} file")
    if reader.format is None:
        raise _fail(url, f"no line is a JSON (or Python-literal) record, so this is not an Amazon {kind} "
                         f"file; it starts with {first[:80]!r}")
    return reader


def _check_quarantine(report: FileReport, quarantine: Quarantine, max_fraction: float) -> None:
    bad = quarantine.counts.get(report.url, 0)
    report.quarantined = bad
    report.first_problems = [f"line {r.line}: {r.reason}" for r in quarantine.records
                             if r.file == report.url][:3]
    if report.records and bad / report.records > max_fraction:
        raise _fail(report.url, f"{bad} of {report.records} records malformed ({bad / report.records:.2%}), more "
                                f"than ingest.max_quarantine_fraction={max_fraction:g}; first: "
                                + "; ".join(report.first_problems))


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def check_source(
    reviews: str,
    meta: str | None,
    raw_dir: Path,
    *,
    policy: RetryPolicy,
    root: Path = Path("."),
    images: bool = True,
    user_core: int = 5,
    item_core: int | None = None,
    category_level: int = 1,
    max_quarantine_fraction: float = 0.01,
    features: dict[str, PrecomputedFeatures] | None = None,
    timestamps: TimestampWindow | None = None,
) -> SourceReport:
    """Fetch ``reviews`` (and ``meta``) into ``raw_dir`` and check that ingest can use them.

    Args:
        reviews, meta: URLs as they will go into params.yaml (http(s), file:, relative to ``root``).
        raw_dir: where the files land, with ``manifest.json`` (ingest's layout).
        policy: retries and timeouts (from ``params.ingest``).
        images: whether the catalog will fetch images (only affects the modality report).
        user_core, item_core: the split's k-core (``item_core`` defaults to ``user_core``); a catalog whose
            k-core leaves no user with a test target is refused, naming a k-core that would keep some.
        category_level, max_quarantine_fraction: the project's params, for the counts.
        features: precomputed feature files by modality (``text``/``image``), fetched and checked too.
        timestamps: review times ingest accepts (default: 1995-01-01 .. now + 1 day); others are quarantined.

    Raises:
        SourceError: the first problem found, naming the URL.
    """
    item_core = user_core if item_core is None else item_core
    timestamps = timestamps or TimestampWindow.from_params()
    features = features or {}
    urls = [reviews] + ([meta] if meta else []) + [u for f in features.values() for u in f.urls()]
    try:
        fetched = download_sources(urls, raw_dir, raw_dir / "manifest.json", policy=policy, concurrency=2,
                                   root=root)
    except DownloadError as exc:
        raise _fail(exc.url, f"not reachable: {exc.reason}") from exc

    quarantine = _SampleQuarantine()  # in memory: the check writes nothing but the fetched files
    with _readable(reviews):
        reader = _reader(fetched[0], "reviews", quarantine, timestamps)
        rev_report = _file_report(fetched[0], "reviews", reader)
    per_user: Counter[str] = Counter()
    user_codes: dict[str, int] = {}
    items: dict[str, int] = {}  # item -> code, in order of first appearance
    codes = {"user_id": array("q"), "item_id": array("q"), "timestamp": array("q")}  # compact, for the k-core
    rated = 0
    first, last = None, None
    with _readable(reviews):
        for review in reader:
            per_user[review.user_id] += 1
            codes["user_id"].append(user_codes.setdefault(review.user_id, len(user_codes)))
            codes["item_id"].append(items.setdefault(review.item_id, len(items)))
            codes["timestamp"].append(review.timestamp)
            rated += review.rating is not None
            first = review.timestamp if first is None else min(first, review.timestamp)
            last = review.timestamp if last is None else max(last, review.timestamp)
    rev_report.records = reader.lines
    _check_quarantine(rev_report, quarantine, max_quarantine_fraction)
    if not per_user:
        raise _fail(reviews, f"no valid review in {reader.lines} records")
    pairs = pl.DataFrame({k: pl.Series(k, v, pl.Int64) for k, v in codes.items()}).unique(maintain_order=True)
    del codes
    report = SourceReport(
        rev_report, None, interactions=sum(per_user.values()), users=len(per_user), items=len(items),
        users_at_core=sum(n >= user_core for n in per_user.values()), user_core=user_core, rated=rated,
        first_day=_day(first), last_day=_day(last), images_wanted=images,
        core=core_report(pairs, user_core, item_core), out_of_window=reader.out_of_window,
    )
    if meta:
        _read_meta(report, fetched[1], items, quarantine, category_level, max_quarantine_fraction)
    by_url = {f.entry.url: f.path for f in fetched}
    for modality, source in features.items():
        try:
            matrix = read_features(by_url[source.file], by_url.get(source.index) if source.index else None,
                                   source.format)
        except FeatureFileError as exc:
            raise _fail(source.file, f"{modality} features unusable: {exc}") from exc
        covered = len(items.keys() & set(matrix.item_ids))
        if covered == 0:
            raise _fail(source.file, f"none of its {len(matrix.item_ids):,} item ids is a reviewed item "
                                     f"(e.g. {matrix.item_ids[:3]}); is the index the right one?")
        report.features[modality] = FeatureReport(source.file, matrix.format, len(matrix.item_ids), matrix.dim,
                                                  covered)
    _check_core(reviews, report, pairs)  # after the files' own problems, which say more
    log.info("source check: %s", "; ".join(f"{m} {why}" for m, why in report.modalities().items()))
    return report


def _check_core(url: str, report: SourceReport, pairs: pl.DataFrame) -> None:
    """Refuse a catalog whose k-core gives no user a test target: its split, training and evaluation would fail."""
    core = report.core
    assert core is not None
    if core.test_users:
        return
    found = (f"its {core.user_core}/{core.item_core}-core keeps {core.interactions:,} of {report.interactions:,} "
             f"interactions and no user with the {MIN_SEQUENCE} interactions leave-one-out needs "
             f"({report.users:,} users, {report.users_at_core:,} with >= {core.user_core} reviews)")
    better = suggest_core(pairs, min(core.user_core, core.item_core))
    if better is None:
        raise _fail(url, f"{found}, and no k-core keeps one: no user has {MIN_SEQUENCE} reviews of items "
                         f"that others reviewed too, so the catalog cannot be split for evaluation")
    raise _fail(url, f"{found}; with --min-interactions {better.user_core} the {better.line()}")


def _read_meta(report: SourceReport, fetched: FetchResult, items: dict[str, None], quarantine: Quarantine,
               category_level: int, max_fraction: float) -> None:
    with _readable(fetched.entry.url):
        reader = _reader(fetched, "meta", quarantine)
        report.meta = _file_report(fetched, "meta", reader)
    fields: Counter[str] = Counter()
    labels: set[str] = set()
    seen: set[str] = set()
    with _readable(fetched.entry.url):
        for meta in reader:
            if meta.item_id not in items or meta.item_id in seen:
                continue
            seen.add(meta.item_id)
            values = {"title": meta.title, "description": meta.description, "brand": meta.brand,
                      "categories": " > ".join(meta.categories) or None, "image_url": meta.image_url}
            for name, value in values.items():
                if value:
                    fields[name] += 1
                    report.examples.setdefault(name, value[:60])
            labels.add(category_label(meta.categories, category_level))
    report.meta.records = reader.lines
    _check_quarantine(report.meta, quarantine, max_fraction)
    report.described, report.fields, report.categories = len(seen), dict(fields), len(labels)
