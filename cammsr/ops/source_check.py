"""Check a new catalog's source files before anything depends on them (``cammsr onboard``).

Fetches the reviews and metadata files exactly as ingest does (`cammsr.ingest.download`: same raw names and
manifest, so ingest later finds them unchanged), detects each file's Amazon format
(`cammsr.ingest.formats.detect_format`), parses every record once, and reports counts and a schema: which
fields the items have, how many items are described, which modalities the catalog can feed.

Anything that would make ingest fail is a `SourceError` naming the URL: unreachable (404, refused),
empty, not an Amazon reviews/metadata file (wrong format, or the two files swapped), too many
malformed lines, no valid review.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cammsr.core.config import PrecomputedFeatures
from cammsr.ingest.download import DownloadError, FetchResult, RetryPolicy, download_sources
from cammsr.ingest.formats import GZIP_MAGIC, FormatError, Kind, SourceReader, decode_record, iter_lines
from cammsr.ingest.normalize import category_label
from cammsr.ingest.quarantine import Quarantine
from features.imported import FeatureFileError, read_features

log = logging.getLogger(__name__)

ITEM_FIELDS = ("title", "description", "brand", "categories", "image_url")
TEXT_FIELDS = ("title", "description", "brand", "categories")  # what features.text's template can use
SCHEMA_RECORDS = 20  # records whose keys make the schema line (as many as format detection reads)


class SourceError(ValueError):
    """A source file cannot be onboarded; the message names the URL and what is wrong."""


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
    except UNREADABLE as exc:
        raise _fail(url, f"unreadable ({exc})") from exc


def _file_report(result: FetchResult, kind: Kind, reader: SourceReader) -> FileReport:
    keys: set[str] = set()
    seen = 0
    for _, raw in iter_lines(result.path):
        try:
            keys |= decode_record(raw).keys()
        except ValueError:
            continue
        seen += 1
        if seen >= SCHEMA_RECORDS:
            break
    with open(result.path, "rb") as fh:
        gzipped = fh.read(2) == GZIP_MAGIC
    return FileReport(kind, result.entry.url, result.entry.bytes, gzipped, str(reader.format), sorted(keys))


def _reader(result: FetchResult, kind: Kind, quarantine: Quarantine) -> SourceReader:
    url = result.entry.url
    try:
        first = next((raw for _, raw in iter_lines(result.path)), None)
        reader = SourceReader(result.path, kind, quarantine, file=url, progress=False) if first else None
    except FormatError as exc:
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
    category_level: int = 1,
    max_quarantine_fraction: float = 0.01,
    features: dict[str, PrecomputedFeatures] | None = None,
) -> SourceReport:
    """Fetch ``reviews`` (and ``meta``) into ``raw_dir`` and check that ingest can use them.

    Args:
        reviews, meta: URLs as they will go into params.yaml (http(s), file:, relative to ``root``).
        raw_dir: where the files land, with ``manifest.json`` (ingest's layout).
        policy: retries and timeouts (from ``params.ingest``).
        images: whether the catalog will fetch images (only affects the modality report).
        user_core, category_level, max_quarantine_fraction: the project's params, for the counts.
        features: precomputed feature files by modality (``text``/``image``), fetched and checked too.

    Raises:
        SourceError: the first problem found, naming the URL.
    """
    features = features or {}
    urls = [reviews] + ([meta] if meta else []) + [u for f in features.values() for u in f.urls()]
    try:
        fetched = download_sources(urls, raw_dir, raw_dir / "manifest.json", policy=policy, concurrency=2,
                                   root=root)
    except DownloadError as exc:
        raise _fail(exc.url, f"not reachable: {exc.reason}") from exc

    quarantine = _SampleQuarantine()  # in memory: the check writes nothing but the fetched files
    reader = _reader(fetched[0], "reviews", quarantine)
    rev_report = _file_report(fetched[0], "reviews", reader)
    per_user: Counter[str] = Counter()
    items: dict[str, None] = {}
    rated = 0
    first, last = None, None
    with _readable(reviews):
        for review in reader:
            per_user[review.user_id] += 1
            items.setdefault(review.item_id)
            rated += review.rating is not None
            first = review.timestamp if first is None else min(first, review.timestamp)
            last = review.timestamp if last is None else max(last, review.timestamp)
    rev_report.records = reader.lines
    _check_quarantine(rev_report, quarantine, max_quarantine_fraction)
    if not per_user:
        raise _fail(reviews, f"no valid review in {reader.lines} records")
    report = SourceReport(
        rev_report, None, interactions=sum(per_user.values()), users=len(per_user), items=len(items),
        users_at_core=sum(n >= user_core for n in per_user.values()), user_core=user_core, rated=rated,
        first_day=_day(first), last_day=_day(last), images_wanted=images,
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
    log.info("source check: %s", "; ".join(f"{m} {why}" for m, why in report.modalities().items()))
    return report


def _read_meta(report: SourceReport, fetched: FetchResult, items: dict[str, None], quarantine: Quarantine,
               category_level: int, max_fraction: float) -> None:
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
