"""Fetch catalog files over http(s) or from local paths: retries, resume, conditional re-download.

Source files land in ``raw/`` under names derived from a hash of their URL (never the URL itself),
described by ``raw/manifest.json``::

    {"1f0c...-reviews_Demo_5.json.gz": {"url": ..., "etag": ..., "last_modified": ..., "sha256": ...,
                                         "bytes": ..., "fetched_at": ...}}

- transient failures (5xx, 408, 429, timeouts, refused or dropped connections) are retried with
  exponential backoff, waiting at least what a ``Retry-After`` header asks (up to ``retry_after_max_s``);
  other 4xx are not, and leave nothing half-written behind; a redirect loop is a plain `DownloadError`;
- a body cut off mid-way resumes from the bytes already in ``<name>.part`` with an HTTP Range request
  (``If-Range`` guards against stitching two versions together; a server that answers 200 restarts it,
  and so does a 206 whose ETag / Last-Modified is not the one the part was started with, or a body whose
  length disagrees with Content-Range: the file is never spliced from two versions);
- ``.part`` files of URLs that are no longer fetched are removed;
- a second run sends If-None-Match / If-Modified-Since, and a 304 does no work; ``file:`` sources are
  compared by size + mtime, then sha256, so an unchanged file is not copied again;
- the sha256 is computed while streaming and the file appears under its final name by one rename.

`fetch_bytes` is the small synchronous API for one small file (the item images).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from tqdm import tqdm

from cammsr.core.atomic import write_json_atomic
from cammsr.core.config import IngestParams
from cammsr.core.digest import file_sha256
from cammsr.core.paths import raw_name

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TRANSIENT_STATUS = frozenset({408, 429})  # 4xx codes that mean "try again later", not "you asked wrongly"
NOT_FOUND_STATUS = frozenset({404, 410})
RAW_NAME = re.compile(r"[0-9a-f]{16}(-[A-Za-z0-9._-]+)?")


class DownloadError(RuntimeError):
    """A fetch that retrying cannot fix; ``str()`` names the URL, ``reason`` says what went wrong.

    ``exit_code`` 2: the URL (a 4xx, a bad scheme, a redirect loop) is the user's to fix.
    """

    exit_code = 2

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class NotFoundError(DownloadError):
    """HTTP 404/410, or a local file that does not exist."""


class TooLargeError(DownloadError):
    """The body is larger than the caller allows."""


class GaveUpError(DownloadError):
    """Transient failures outlived the retry budget (the server or the network, not the URL): exit code 1."""

    exit_code = 1


class TransientError(Exception):
    """A failure worth another attempt (5xx, 408/429, a refused resume); ``retry_after``: seconds the server asked."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError, OverflowError):
        return None


def _request_error(url: str, exc: Exception) -> DownloadError:
    """A non-transient httpx failure as a `DownloadError` naming the URL (never a traceback)."""
    if isinstance(exc, httpx.TooManyRedirects):
        return DownloadError(url, "too many redirects (a redirect loop?)")
    return DownloadError(url, f"{type(exc).__name__}: {exc}")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError):
        return True
    # TransportError covers timeouts, connect errors and bodies cut short; a bad scheme is not transient.
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.UnsupportedProtocol)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``retries`` extra attempts, waiting base, 2*base, 4*base... capped at max."""

    retries: int = 4
    timeout_s: float = 30.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: float = 120.0  # a server's Retry-After is honoured up to this

    @classmethod
    def from_params(cls, params: IngestParams, **overrides: float) -> RetryPolicy:
        return cls(**{"retries": params.retries, "timeout_s": params.timeout_s, **overrides})

    def wait(self) -> Callable[[RetryCallState], float]:
        """Exponential backoff, or the server's Retry-After when that is longer (capped)."""
        backoff = wait_exponential(multiplier=self.backoff_base_s, max=self.backoff_max_s)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            asked = getattr(exc, "retry_after", None)
            return max(backoff(state), min(asked, self.retry_after_max_s)) if asked else backoff(state)

        return wait

    def retrying(self) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=self.wait(),
            retry=retry_if_exception(_is_transient),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )


def make_client(policy: RetryPolicy, max_connections: int = 8) -> httpx.Client:
    """An httpx client for many threads; ``identity`` so files are stored exactly as served."""
    return httpx.Client(
        timeout=policy.timeout_s,
        follow_redirects=True,
        limits=httpx.Limits(max_connections=max_connections),
        headers={"Accept-Encoding": "identity", "User-Agent": "cammsr-ingest"},
    )


# ---------------------------------------------------------------------------------------------- URLs


def local_path(url: str, root: Path) -> Path | None:
    """The file a ``file:`` URL or plain path names (relative ones under ``root``); None for http(s)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(url, f"file URLs with a host ({parts.netloc!r}) are not supported")
        path = Path(unquote(parts.path))
    elif scheme == "":
        path = Path(url)
    else:
        raise DownloadError(url, f"unsupported URL scheme {scheme!r} (expected http, https or file)")
    return path if path.is_absolute() else Path(root) / path


def resolve_reference(base: str, ref: str | None) -> str | None:
    """``ref`` (an image URL from a metadata file) resolved against ``base`` (that file's URL).

    Like `urllib.parse.urljoin`, except that a relative ``file:`` base stays relative
    (urljoin would turn ``file:data/x`` into ``file:///data/x``).
    """
    if ref is None or not ref.strip():
        return None
    ref = ref.strip()
    if urlsplit(ref).scheme or ref.startswith("//"):
        return urljoin(base, ref) if ref.startswith("//") else ref
    parts = urlsplit(base)
    relative_file = parts.scheme in ("file", "") and not parts.netloc and not parts.path.startswith("/")
    if not relative_file:
        return urljoin(base, ref)
    prefix = "file:" if parts.scheme == "file" else ""
    if ref.startswith("/"):
        return prefix + ref
    return prefix + posixpath.normpath(posixpath.join(posixpath.dirname(parts.path), ref))


# ------------------------------------------------------------------------------------------ manifest


@dataclass
class ManifestEntry:
    """What ``raw/manifest.json`` records about one file."""

    url: str
    sha256: str
    bytes: int
    fetched_at: str
    etag: str | None = None
    last_modified: str | None = None
    source_size: int | None = None  # file: sources only, for the cheap "unchanged" check
    source_mtime_ns: int | None = None


@dataclass(frozen=True)
class FetchResult:
    """One fetched file: its manifest entry, where it is, and whether this run changed it."""

    name: str
    path: Path
    entry: ManifestEntry
    changed: bool
    bytes_transferred: int


def read_manifest(path: Path) -> dict[str, ManifestEntry]:
    """The manifest at ``path``; a missing or unreadable one is empty (everything is re-fetched)."""
    if not path.is_file():
        return {}
    known = {f.name for f in fields(ManifestEntry)}
    try:
        raw = json.loads(path.read_text())
        return {name: ManifestEntry(**{k: v for k, v in e.items() if k in known}) for name, e in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("%s: unreadable manifest (%s); re-fetching everything", path, exc)
        return {}


def write_manifest(path: Path, entries: dict[str, ManifestEntry]) -> None:
    write_json_atomic(path, {name: asdict(e) for name, e in sorted(entries.items())})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- single files


class _Part:
    """A ``.part`` file and the sha256 of what it holds, kept in step while streaming.

    Beside it, ``<name>.part.validator`` records the version it is a prefix of: the server's ETag or
    Last-Modified and the total size it announced, so a resume is checked against both.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.validator_path = path.with_name(path.name + ".validator")
        self.hasher = hashlib.sha256()
        self.size = 0
        self.transferred = 0  # bytes received in this run (restarts included)
        self.validator: str | None = None
        self.total: int | None = None  # the size the first answer announced
        if path.is_file():  # left by an earlier run: resume from it
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                    self.hasher.update(chunk)
                    self.size += len(chunk)
            if self.validator_path.is_file():
                self.validator, self.total = _read_validator(self.validator_path.read_text())

    def reset(self, validator: str | None, total: int | None = None) -> None:
        self.path.write_bytes(b"")
        self.hasher, self.size, self.validator, self.total = hashlib.sha256(), 0, validator, total
        if validator or total is not None:
            self.validator_path.write_text(json.dumps({"validator": validator, "total": total}))
        else:
            self.validator_path.unlink(missing_ok=True)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.validator_path.unlink(missing_ok=True)


def _read_validator(text: str) -> tuple[str | None, int | None]:
    try:
        data = json.loads(text)
        return data.get("validator"), data.get("total")
    except (ValueError, AttributeError):  # a plain validator, as older runs wrote it
        return text.strip() or None, None


def _check_status(url: str, status: int, headers: httpx.Headers | None = None) -> None:
    if status >= 500 or status in TRANSIENT_STATUS:
        raise TransientError(f"HTTP {status}", _retry_after(headers.get("retry-after") if headers else None))
    if status in NOT_FOUND_STATUS:
        raise NotFoundError(url, f"HTTP {status} (not found)")
    if status >= 400:
        raise DownloadError(url, f"HTTP {status}")


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", header or "")
    return int(match.group(1)) if match else None


def _content_range_total(header: str | None) -> int | None:
    match = re.match(r"bytes \d+-\d+/(\d+)", header or "")
    return int(match.group(1)) if match else None


def _http_attempt(
    client: httpx.Client, url: str, part: _Part, conditional: dict[str, str], meta: dict[str, str | None]
) -> bool:
    """One GET into ``part``; True when the body is complete, False on 304 (nothing to do)."""
    headers = dict(conditional) if part.size == 0 else {"Range": f"bytes={part.size}-"}
    if part.size and part.validator:
        headers["If-Range"] = part.validator
    with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code == 304:
            if conditional and "Range" not in headers:
                return False
            raise DownloadError(url, "HTTP 304 to a request that was not conditional")
        if resp.status_code == 416:  # our offset is past the server's file: start over
            part.reset(None)
            raise TransientError("HTTP 416 for a resume range; restarting from zero")
        _check_status(url, resp.status_code, resp.headers)
        if resp.status_code not in (200, 206):
            raise DownloadError(url, f"unexpected HTTP {resp.status_code}")
        validator = resp.headers.get("etag") or resp.headers.get("last-modified")
        if resp.status_code == 206:
            if _content_range_start(resp.headers.get("content-range")) != part.size:
                part.reset(None)
                raise TransientError(f"Content-Range {resp.headers.get('content-range')!r} != bytes={part.size}-")
            expected = _content_range_total(resp.headers.get("content-range"))
            changed = (part.validator and validator and validator != part.validator) or (
                part.total is not None and expected is not None and expected != part.total)
            if changed:  # If-Range ignored (or no validator to send): these bytes belong to another version
                log.warning("%s: changed on the server since the partial download (%s, %s bytes; now %s, %s "
                            "bytes); restarting", url, part.validator, part.total, validator, expected)
                part.reset(None)
                raise TransientError("the file changed between attempts; restarting from zero")
        else:  # a fresh body (first try, or the server ignored Range)
            if part.size:
                log.info("%s: server answered %d to a Range request; restarting", url, resp.status_code)
            length = resp.headers.get("content-length", "")
            expected = int(length) if length.isdigit() else None
            part.reset(validator, expected)
        for key, header in (("etag", "etag"), ("last_modified", "last-modified")):
            meta[key] = resp.headers.get(header) or meta.get(key)
        total = resp.headers.get("content-length")
        bar_total = int(total) + part.size if total and total.isdigit() else None
        with (
            open(part.path, "ab") as fh,
            tqdm(total=bar_total, initial=part.size, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                 disable=None, leave=False) as bar,
        ):
            for chunk in resp.iter_raw():
                fh.write(chunk)
                part.hasher.update(chunk)
                part.size += len(chunk)
                part.transferred += len(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    if expected is not None and part.size != expected:  # a body that disagrees with what was announced
        size = part.size
        if size > expected:
            part.reset(None)
        raise TransientError(f"received {size} bytes where the server announced {expected}")
    return True


def _fetch_http(
    client: httpx.Client, url: str, dest: Path, policy: RetryPolicy, previous: ManifestEntry | None
) -> FetchResult:
    part = _Part(dest.with_name(dest.name + ".part"))
    conditional: dict[str, str] = {}
    if previous and previous.url == url and dest.is_file() and dest.stat().st_size == previous.bytes:
        if previous.etag:
            conditional["If-None-Match"] = previous.etag
        if previous.last_modified:
            conditional["If-Modified-Since"] = previous.last_modified
    meta: dict[str, str | None] = {}
    try:
        for attempt in policy.retrying():
            with attempt:
                complete = _http_attempt(client, url, part, conditional, meta)
    except DownloadError:
        part.discard()
        raise
    except Exception as exc:
        if _is_transient(exc):  # keep the .part: the next run resumes from it
            raise GaveUpError(url, f"gave up after {policy.retries + 1} attempts: {exc!r}") from exc
        part.discard()
        if isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
            raise _request_error(url, exc) from exc
        raise
    if not complete:
        assert previous is not None  # a 304 only answers the conditional request built from it
        log.info("%s: not modified (304); keeping %s", url, dest.name)
        return FetchResult(dest.name, dest, previous, changed=False, bytes_transferred=0)
    os.replace(part.path, dest)
    part.validator_path.unlink(missing_ok=True)
    entry = ManifestEntry(
        url, part.hasher.hexdigest(), part.size, _now(), meta.get("etag"), meta.get("last_modified")
    )
    return FetchResult(dest.name, dest, entry, changed=True, bytes_transferred=part.transferred)


def _fetch_local(src: Path, url: str, dest: Path, previous: ManifestEntry | None) -> FetchResult:
    if not src.is_file():
        raise NotFoundError(url, f"no such file {src}")
    stat = src.stat()
    if previous and previous.url == url and dest.is_file() and dest.stat().st_size == previous.bytes:
        if (previous.source_size, previous.source_mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            return FetchResult(dest.name, dest, previous, changed=False, bytes_transferred=0)
        if stat.st_size == previous.bytes and file_sha256(src) == previous.sha256:  # touched, not changed
            entry = ManifestEntry(**{**asdict(previous), "source_mtime_ns": stat.st_mtime_ns})
            return FetchResult(dest.name, dest, entry, changed=False, bytes_transferred=0)
    part = dest.with_name(dest.name + ".part")
    hasher, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout:
            for chunk in iter(lambda: fin.read(CHUNK_BYTES), b""):
                fout.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    entry = ManifestEntry(url, hasher.hexdigest(), size, _now(), source_size=stat.st_size,
                          source_mtime_ns=stat.st_mtime_ns)
    return FetchResult(dest.name, dest, entry, changed=True, bytes_transferred=size)


def fetch_file(
    url: str,
    dest: Path,
    *,
    client: httpx.Client,
    policy: RetryPolicy,
    root: Path = Path("."),
    previous: ManifestEntry | None = None,
) -> FetchResult:
    """Fetch ``url`` to ``dest`` (atomically), doing no work when ``previous`` says it is unchanged.

    Raises:
        NotFoundError: 404/410 or a missing local file (no ``dest`` nor ``.part`` is left behind).
        DownloadError: any other 4xx, or transient failures that outlived the retries.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = local_path(url, root)
    if src is not None:
        return _fetch_local(src, url, dest, previous)
    return _fetch_http(client, url, dest, policy, previous)


def fetch_bytes(
    url: str,
    *,
    client: httpx.Client,
    policy: RetryPolicy,
    root: Path = Path("."),
    max_bytes: int | None = None,
) -> bytes:
    """The body of ``url`` in memory (small files: images), with the same retry policy.

    Raises:
        NotFoundError, TooLargeError, DownloadError (see `fetch_file`).
    """
    src = local_path(url, root)
    if src is not None:
        if not src.is_file():
            raise NotFoundError(url, f"no such file {src}")
        if max_bytes is not None and src.stat().st_size > max_bytes:
            raise TooLargeError(url, f"too large ({src.stat().st_size} > {max_bytes} bytes)")
        return src.read_bytes()

    def attempt() -> bytes:
        with client.stream("GET", url) as resp:
            _check_status(url, resp.status_code, resp.headers)
            declared = resp.headers.get("content-length", "")
            if max_bytes is not None and declared.isdigit() and int(declared) > max_bytes:
                raise TooLargeError(url, f"too large ({declared} > {max_bytes} bytes)")
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if max_bytes is not None and len(body) > max_bytes:
                    raise TooLargeError(url, f"too large (> {max_bytes} bytes)")
            return bytes(body)

    try:
        for try_ in policy.retrying():
            with try_:
                return attempt()
    except DownloadError:
        raise
    except Exception as exc:
        if _is_transient(exc):
            raise GaveUpError(url, f"gave up after {policy.retries + 1} attempts: {exc!r}") from exc
        if isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
            raise _request_error(url, exc) from exc
        raise
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------- many files


def download_sources(
    urls: Sequence[str],
    raw_dir: Path,
    manifest_path: Path,
    *,
    policy: RetryPolicy,
    concurrency: int = 8,
    root: Path = Path("."),
) -> list[FetchResult]:
    """Fetch every URL into ``raw_dir`` in parallel and rewrite the manifest; results in input order.

    A URL listed twice is fetched once. Entries and files of URLs no longer listed are dropped. When
    a fetch fails the manifest still records the others (and the previous entry of the failed one),
    then the first error is raised.
    """
    raw_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(manifest_path)
    unique = list(dict.fromkeys(urls))
    names = [raw_name(url) for url in unique]
    with make_client(policy, concurrency) as client, ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [
            pool.submit(fetch_file, url, raw_dir / name, client=client, policy=policy, root=root,
                        previous=previous.get(name))
            for url, name in zip(unique, names, strict=True)
        ]
        outcomes: list[FetchResult | BaseException] = []
        for future in futures:
            exc = future.exception()
            outcomes.append(exc if exc is not None else future.result())
    entries = {name: previous[name] for name in names if name in previous and (raw_dir / name).is_file()}
    entries.update({r.name: r.entry for r in outcomes if isinstance(r, FetchResult)})
    for stale in set(previous) - set(names):  # files this stage wrote for URLs no longer in the catalog
        if RAW_NAME.fullmatch(stale):  # never a path taken on trust from the manifest
            (raw_dir / stale).unlink(missing_ok=True)
    for leftover in [*raw_dir.glob("*.part"), *raw_dir.glob("*.part.validator")]:  # partial downloads of
        if leftover.name.split(".part")[0] not in names:  # URLs no longer fetched: nothing will resume them
            leftover.unlink(missing_ok=True)
    write_manifest(manifest_path, entries)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    by_url = {url: r for url, r in zip(unique, outcomes, strict=True) if isinstance(r, FetchResult)}
    return [by_url[url] for url in urls]
