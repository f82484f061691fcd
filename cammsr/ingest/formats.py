"""Amazon review and metadata files (2014, 2018, 2023): format detection and streaming parsers.

Files are read one line at a time (gzip or plain, told apart by magic bytes, never by name), and the
format is told from the keys of the first valid records:

- amazon-2014: reviews ``reviewerID, asin, unixReviewTime`` (s), ``overall``, ``helpful``; metadata
  ``asin, categories`` ([[path], ...]), ``imUrl``, written as Python literals (``{'asin': ...}``).
- amazon-2018: reviews as 2014 plus ``vote / verified / style``; metadata ``asin``, ``category`` (flat)
  and/or ``categories`` (nested), ``imageURLHighRes / imageURL`` lists, description str or list.
- amazon-2023: reviews ``user_id, parent_asin, timestamp`` (MILLISECONDS), ``rating``; metadata
  ``parent_asin, store`` (brand), ``categories`` (flat), ``main_category``,
  ``images`` ([{hi_res, large, thumb}]).

All parse into the same two shapes, `Review` and `ItemMeta`. A line that cannot be used goes to the
`Quarantine` with its 1-based line number and the reason; it never stops the run, whatever went wrong
with it (a parser error, a nesting deep enough to exhaust the recursion limit, a line longer than
`MAX_LINE_BYTES`, a review dated outside the `TimestampWindow`). Only a file that cannot be read on
(a gzip stream cut short or corrupt: `CorruptFileError`, naming the file and line) or an OS error stops it.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import math
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from cammsr.core.errors import BadInput
from cammsr.ingest.quarantine import Quarantine

Kind = Literal["reviews", "meta"]
GZIP_MAGIC = b"\x1f\x8b"
DETECT_RECORDS = 20  # valid records whose keys decide the format
MAX_LINE_BYTES = 16 << 20  # an Amazon metadata line is at most a few hundred KB; longer is junk, not memory to spend


class Format(StrEnum):
    AMAZON_2014 = "amazon-2014"
    AMAZON_2018 = "amazon-2018"
    AMAZON_2023 = "amazon-2023"


@dataclass(frozen=True, slots=True)
class Review:
    user_id: str
    item_id: str
    timestamp: int  # unix seconds
    rating: float | None


@dataclass(frozen=True, slots=True)
class ItemMeta:
    item_id: str
    title: str | None
    description: str | None
    brand: str | None
    categories: tuple[str, ...]  # the first category path, top level first
    image_url: str | None  # as written in the file (may be relative); the best single URL


class RecordError(ValueError):
    """One record cannot be used; the message is the quarantine reason."""


class FormatError(BadInput, ValueError):
    """A whole file is not what it should be (e.g. metadata given as reviews); names the file."""


class CorruptFileError(BadInput, ValueError):
    """A file cannot be read on (gzip cut short or corrupt); names the file and the line it stopped at."""


UNREADABLE = (EOFError, zlib.error, gzip.BadGzipFile)  # a compressed stream cut short or corrupt


class LongLine(bytes):
    """The start of a line longer than `MAX_LINE_BYTES` (the rest was skipped); `decode_record` refuses it."""


@dataclass(frozen=True)
class TimestampWindow:
    """Review times a catalog can hold: from ``first`` to ``last`` (unix seconds, inclusive).

    The default is 1995-01-01 (before Amazon had reviews) to one day after now: a time in milliseconds
    read as seconds lands in the year 46,000 and would otherwise become a user's test target.
    """

    first: int
    last: int

    @classmethod
    def from_params(cls, min_date: date | str = "1995-01-01", max_days_ahead: float = 1.0,
                    now: float | None = None) -> TimestampWindow:
        """From ``ingest.min_review_date`` (a day, UTC) and ``ingest.max_days_ahead``."""
        day = date.fromisoformat(min_date) if isinstance(min_date, str) else min_date
        first = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        return cls(first, int((time.time() if now is None else now) + max_days_ahead * 86400))

    def check(self, timestamp: int, name: str) -> None:
        """Raise `RecordError` naming the field ``name`` when ``timestamp`` (unix s) is outside the window."""
        if timestamp < self.first:
            raise RecordError(f"{name}: {timestamp} is before {_day(self.first)} (ingest.min_review_date)")
        if timestamp > self.last:
            hint = "; milliseconds where seconds are expected?" if self.first <= timestamp // 1000 <= self.last \
                else ""
            raise RecordError(f"{name}: {timestamp} is after {_day(self.last)} (ingest.max_days_ahead){hint}")


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


# ------------------------------------------------------------------------------------------ reading


def iter_lines(path: Path, label: str | None = None, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for each non-blank line; numbers are 1-based and count blanks.

    A line longer than ``max_bytes`` comes as a `LongLine` holding its start (memory stays bounded).

    Raises:
        CorruptFileError: the gzip stream is cut short or corrupt (names ``label`` and the line).
    """
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == GZIP_MAGIC
    opener = gzip.open if gzipped else open
    number = 0
    try:
        with opener(path, "rb") as fh:
            while line := fh.readline(max_bytes + 1):
                number += 1
                if len(line) > max_bytes and not line.endswith(b"\n"):
                    while (rest := fh.readline(max_bytes + 1)) and not rest.endswith(b"\n"):
                        pass
                    yield number, LongLine(line[:500])
                    continue
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield number, line
    except UNREADABLE as exc:
        what = "gzip stream cut short" if isinstance(exc, EOFError) else "corrupt compressed data"
        raise CorruptFileError(f"{label or path}: line {number + 1}: unreadable, {what} ({exc}); the file is "
                               f"damaged or was not fully downloaded") from exc


def decode_record(raw: bytes) -> dict[str, Any]:
    """One line as a dict: JSON, else a Python literal (the 2014 metadata files)."""
    if isinstance(raw, LongLine):
        raise RecordError(f"line longer than {MAX_LINE_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise RecordError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        record = json.loads(text)
    except RecursionError as exc:
        raise RecordError("nested too deeply to parse") from exc
    except json.JSONDecodeError as json_exc:
        try:
            record = ast.literal_eval(text)
        except RecursionError as exc:
            raise RecordError("nested too deeply to parse") from exc
        except (ValueError, SyntaxError, TypeError, MemoryError):
            hint = "; a JSON array? expected JSON Lines, one object per line" if text.lstrip().startswith("[") \
                else ""
            raise RecordError(f"neither JSON nor a Python literal ({json_exc}){hint}") from json_exc
    if isinstance(record, list):
        raise RecordError("expected an object, found a JSON array: expected JSON Lines, one object per line")
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, found {type(record).__name__}")
    return record


# ---------------------------------------------------------------------------------------- detection

_LEGACY_REVIEW_KEYS = {"reviewerID", "unixReviewTime", "overall", "reviewTime"}
_2018_REVIEW_KEYS = {"vote", "verified", "style"}
_2023_META_KEYS = {"parent_asin", "main_category", "store"}
_2018_META_KEYS = {"category", "imageURL", "imageURLHighRes", "main_cat", "also_buy", "also_view", "rank"}
_USER_KEYS = {"user_id", "reviewerID"}


def format_from_keys(keys: set[str], kind: Kind, file: str) -> Format:
    """The format whose keys ``keys`` (the union over the first records) match; FormatError if none."""
    if kind == "reviews":
        if "user_id" in keys:
            return Format.AMAZON_2023
        if keys & _LEGACY_REVIEW_KEYS:
            return Format.AMAZON_2018 if keys & _2018_REVIEW_KEYS else Format.AMAZON_2014
        hint = " (this looks like a metadata file)" if "asin" in keys or "parent_asin" in keys else ""
        expected = "reviewerID/asin/unixReviewTime (2014, 2018) or user_id/parent_asin/timestamp (2023)"
    else:
        if not keys & _USER_KEYS:
            if keys & _2023_META_KEYS:
                return Format.AMAZON_2023
            if keys & _2018_META_KEYS:
                return Format.AMAZON_2018
            if "asin" in keys:
                return Format.AMAZON_2014
        hint = " (this looks like a reviews file)" if keys & _USER_KEYS else ""
        expected = "asin (2014, 2018) or parent_asin (2023)"
    raise FormatError(
        f"{file}: records have keys {sorted(keys)[:20]}, which match no Amazon {kind} format{hint}; "
        f"expected {expected}"
    )


def detect_format(path: Path, kind: Kind, file: str | None = None) -> Format | None:
    """The format of ``path`` from the keys of its first valid records; None if it holds none.

    Each record votes for 2023 or the 2014/2018 family (a stray record cannot flip a whole file); the
    family's records together tell 2014 from 2018. When no record matches any format, the error is
    about the keys of all of them (e.g. "this looks like a metadata file").
    """
    label = file or str(path)
    union: set[str] = set()
    family_keys: dict[bool, set[str]] = {True: set(), False: set()}  # is 2023 -> keys of its voters
    votes: Counter[bool] = Counter()
    seen = 0
    for _, raw in iter_lines(path, file):
        try:
            keys = {str(k) for k in decode_record(raw)}
        except Exception:  # any record that does not decode only does not count
            continue
        union |= keys
        seen += 1
        try:
            modern = format_from_keys(keys, kind, label) is Format.AMAZON_2023
            votes[modern] += 1
            family_keys[modern] |= keys
        except FormatError:
            pass
        if seen >= DETECT_RECORDS:
            break
    if not seen:
        return None
    if not votes:
        return format_from_keys(union, kind, label)  # raises, naming what the records hold
    modern = votes[True] > votes[False]
    return format_from_keys(family_keys[modern], kind, label)


# ------------------------------------------------------------------------------------ field helpers


def _id(record: dict[str, Any], *names: str) -> str:
    for name in names:
        value = record.get(name)
        if isinstance(value, bool):
            continue
        if isinstance(value, int | str) and str(value).strip():
            return str(value).strip()
    raise RecordError(f"missing {' / '.join(names)}")


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise RecordError(f"{name}: expected an integer, found {value!r}")
    try:
        number = int(value) if isinstance(value, int | str) else int(float(value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise RecordError(f"{name}: expected an integer, found {value!r}") from exc
    if isinstance(value, float) and value != number:
        raise RecordError(f"{name}: expected an integer, found {value!r}")
    if abs(number) >= 2**62:
        raise RecordError(f"{name}: {value!r} is out of range")
    return number


def _rating(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        rating = float(value)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{name}: expected a number, found {value!r}") from exc
    if not math.isfinite(rating):
        raise RecordError(f"{name}: expected a number, found {value!r}")
    return rating


def _text(value: Any) -> str | None:
    """A string field that may also come as a list of paragraphs (2018/2023 descriptions)."""
    if isinstance(value, list):
        value = " ".join(str(v).strip() for v in value if isinstance(v, str | int | float) and str(v).strip())
    elif value is not None and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _path(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list):
        return ()
    names = (html.unescape(v).strip() for v in values if isinstance(v, str))
    return tuple(n for n in names if n)


def _first_url(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


# ------------------------------------------------------------------------------------------ records


def _legacy_review(rec: dict[str, Any]) -> Review:
    user, item = _id(rec, "reviewerID"), _id(rec, "asin")
    if rec.get("unixReviewTime") is not None:
        timestamp = _int(rec["unixReviewTime"], "unixReviewTime")
    elif isinstance(rec.get("reviewTime"), str):  # "09 13, 2009": midnight UTC of that day
        try:
            day = datetime.strptime(rec["reviewTime"].strip(), "%m %d, %Y").replace(tzinfo=UTC)
        except ValueError as exc:
            raise RecordError(f"reviewTime: expected 'MM DD, YYYY', found {rec['reviewTime']!r}") from exc
        timestamp = int(day.timestamp())
    else:
        raise RecordError("missing unixReviewTime")
    return Review(user, item, timestamp, _rating(rec.get("overall"), "overall"))


def _review_2023(rec: dict[str, Any]) -> Review:
    user, item = _id(rec, "user_id"), _id(rec, "parent_asin", "asin")
    if rec.get("timestamp") is None:
        raise RecordError("missing timestamp")
    millis = _int(rec["timestamp"], "timestamp")
    return Review(user, item, millis // 1000, _rating(rec.get("rating"), "rating"))


def _legacy_meta(rec: dict[str, Any]) -> ItemMeta:
    nested = rec.get("categories")
    if isinstance(nested, list) and nested and isinstance(nested[0], list):
        categories = _path(nested[0])
    else:  # 2018's flat `category`, or a flat `categories`
        categories = _path(rec.get("category")) or _path(nested)
    image = next(
        (url for key in ("imageURLHighRes", "imageURL", "imUrl") if (url := _first_url(rec.get(key)))), None
    )
    return ItemMeta(
        _id(rec, "asin"), _text(rec.get("title")), _text(rec.get("description")), _text(rec.get("brand")),
        categories, image,
    )


def _image_2023(images: Any) -> str | None:
    """hi_res > large > thumb of the first image that has any (list of dicts, or a dict of lists)."""
    if isinstance(images, dict):
        for size in ("hi_res", "large", "thumb"):
            if url := _first_url(images.get(size)):
                return url
        return None
    for image in images if isinstance(images, list) else []:
        if isinstance(image, dict):
            for size in ("hi_res", "large", "thumb"):
                if url := _first_url(image.get(size)):
                    return url
    return None


def _meta_2023(rec: dict[str, Any]) -> ItemMeta:
    categories = _path(rec.get("categories")) or _path([rec.get("main_category")])
    return ItemMeta(
        _id(rec, "parent_asin", "asin"), _text(rec.get("title")), _text(rec.get("description")),
        _text(rec.get("store")), categories, _image_2023(rec.get("images")),
    )


_TIME_FIELD = {Format.AMAZON_2014: "unixReviewTime", Format.AMAZON_2018: "unixReviewTime",
               Format.AMAZON_2023: "timestamp"}

_PARSERS: dict[tuple[Kind, Format], Callable[[dict[str, Any]], Any]] = {
    ("reviews", Format.AMAZON_2014): _legacy_review,
    ("reviews", Format.AMAZON_2018): _legacy_review,
    ("reviews", Format.AMAZON_2023): _review_2023,
    ("meta", Format.AMAZON_2014): _legacy_meta,
    ("meta", Format.AMAZON_2018): _legacy_meta,
    ("meta", Format.AMAZON_2023): _meta_2023,
}


@dataclass
class SourceReader:
    """Iterate the records of one file, quarantining the bad ones; ``lines`` counts records read.

    Example:
        >>> reader = SourceReader(path, "reviews", quarantine, file="raw/x-reviews.json.gz")
        >>> for review in reader: ...
    """

    path: Path
    kind: Kind
    quarantine: Quarantine
    file: str = ""
    progress: bool = True
    timestamps: TimestampWindow | None = None  # reviews outside it are quarantined (the stages pass ingest's)
    source: str = ""  # what errors call the file (its URL); default ``file``
    format: Format | None = field(init=False)
    lines: int = field(default=0, init=False)
    out_of_window: int = field(default=0, init=False)  # reviews quarantined for their timestamp

    def __post_init__(self) -> None:
        self.file = self.file or str(self.path)
        self.format = detect_format(self.path, self.kind, self.source or self.file)

    def _record(self, raw: bytes, parse: Callable[[dict[str, Any]], Any] | None) -> Any:
        """One line parsed; raises RecordError (or anything a hostile line provokes) when it cannot be used."""
        record = decode_record(raw)
        if parse is None:
            raise RecordError(f"no line of this file is a valid {self.kind} record")
        parsed = parse(record)
        if self.timestamps is not None and isinstance(parsed, Review):
            try:
                self.timestamps.check(parsed.timestamp, _TIME_FIELD.get(self.format, "timestamp"))
            except RecordError:
                self.out_of_window += 1
                raise
        return parsed

    def __iter__(self) -> Iterator[Any]:
        parse = _PARSERS.get((self.kind, self.format)) if self.format else None
        self.lines = self.out_of_window = 0
        bar = tqdm(unit=" lines", desc=self.file.rsplit("/", 1)[-1], disable=None if self.progress else True,
                   mininterval=1.0)
        with bar:
            for number, raw in iter_lines(self.path, self.source or self.file):
                self.lines += 1
                if self.lines % 10_000 == 0:
                    bar.update(10_000)
                try:
                    parsed = self._record(raw, parse)
                except RecordError as exc:
                    self.quarantine.add(self.file, number, str(exc), raw)
                    continue
                except Exception as exc:  # one record's failure, whatever it is, is that record's
                    self.quarantine.add(self.file, number, f"unparseable ({type(exc).__name__}: {exc})"[:300], raw)
                    continue
                yield parsed
            bar.update(self.lines % 10_000)


def read_reviews(path: Path, quarantine: Quarantine, file: str = "") -> Iterator[Review]:
    """Shorthand: the reviews of ``path`` (any supported format)."""
    return iter(SourceReader(path, "reviews", quarantine, file))


def read_meta(path: Path, quarantine: Quarantine, file: str = "") -> Iterator[ItemMeta]:
    """Shorthand: the item metadata of ``path`` (any supported format)."""
    return iter(SourceReader(path, "meta", quarantine, file))
