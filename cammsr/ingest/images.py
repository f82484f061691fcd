"""One image per item: fetch, check that it decodes, store under a hashed path, record the outcome.

``images.parquet`` has a row for EVERY item (``IMAGES_SCHEMA``)::

    item_id | path (relative to the catalog folder) | sha256 (of the bytes) | status

with status ``ok``, ``missing`` (no URL, HTTP 404/410, or no such local file) or ``failed: <reason>``
(undecodable, too large, too many pixels, network error after the retries, or ``refused: <why>``). A bad
image never fails the run; a full disk or a permission error does (`StorageError`), since it says
nothing about the image and every later one would fail the same way. Once the new table is in place,
stored files it no longer points at are removed (`remove_unreferenced`): the folder holds exactly its images.

Which URLs are fetched at all (`image_source`): http(s), or a ``file:`` URL / path that resolves (``..``
and symlinks followed) inside ``local_root``, the folder of the metadata file that named it, and only
when that metadata file is itself local. Anything else (``/etc/passwd``, ``../../elsewhere/x.png``, a
local path named by metadata that came over http, another scheme) is ``failed: refused: <why>``
and nothing is read. Files live at ``images/<sha256(item_id)[:2]>/<sha256(url)>.<ext>`` (ext from the decoded
format, not the URL). A re-run keeps every ``ok`` row whose file is still there with the same URL
and sha256 without a request; the others are tried again. With ``catalog.images: false`` every item
gets a ``missing`` row (`missing_images_table`), so downstream joins see each item exactly once.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cammsr.core.atomic import write_bytes_atomic
from cammsr.core.config import IngestParams
from cammsr.core.digest import file_sha256
from cammsr.core.errors import is_storage_error, storage_error
from cammsr.ingest.download import (
    DownloadError,
    NotFoundError,
    RetryPolicy,
    TooLargeError,
    fetch_bytes,
    local_path,
    make_client,
)

log = logging.getLogger(__name__)

OK, MISSING = "ok", "missing"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),  # relative to the catalog folder, "/"-separated; null unless ok
        pa.field("sha256", pa.string()),  # of the stored bytes; null unless ok
        pa.field("status", pa.string(), nullable=False),  # ok | missing | failed: <reason>
    ]
)


@dataclass(frozen=True)
class ImageRow:
    item_id: str
    path: str | None
    sha256: str | None
    status: str


@dataclass(frozen=True)
class ImageCounts:
    ok: int = 0
    missing: int = 0
    failed: int = 0  # refused ones included
    reused: int = 0  # ok rows kept from the previous run without a request
    bytes_downloaded: int = 0
    refused: int = 0  # URLs not fetched at all (`image_source`)


class ImageRejected(ValueError):
    """The bytes arrived but are not a usable image."""


class ImageRefused(ValueError):
    """The URL is not one an image may come from (`image_source`); nothing was read."""


REFUSED = "failed: refused: "


def image_source(url: str, local_root: Path | None, root: Path = Path(".")) -> str | Path:
    """Where an image may be read from: the URL itself (http/https) or a resolved local file.

    Args:
        url: the item's image URL, already resolved against its metadata file's URL.
        local_root: the folder of the metadata file when that file is local; None when it came over
            http(s) (then no local file may be named).
        root: where relative paths start (the project root), as for every ``file:`` URL of a catalog.

    Raises:
        ImageRefused: anything but http(s), or a local path that resolves outside ``local_root``.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return url
    if scheme not in ("file", ""):
        raise ImageRefused(f"URL scheme {scheme!r} (an image URL is http(s), or a file beside the metadata)")
    if local_root is None:
        raise ImageRefused("a local path named by metadata that did not come from a local file")
    try:
        path = local_path(url, root)
    except DownloadError as exc:
        raise ImageRefused(exc.reason) from exc
    assert path is not None
    resolved, base = path.resolve(), Path(local_root).resolve()
    if base not in resolved.parents:
        raise ImageRefused(f"a local path outside the metadata's folder {base}")
    return resolved


def _read_local(path: Path, url: str, max_bytes: int) -> bytes:
    """The bytes of an allowed local image (`image_source`), with `fetch_bytes`'s errors."""
    if not path.is_file():
        raise NotFoundError(url, f"no such file {path}")
    if path.stat().st_size > max_bytes:
        raise TooLargeError(url, f"too large ({path.stat().st_size} > {max_bytes} bytes)")
    return path.read_bytes()


def image_path(item_id: str, url: str, ext: str) -> PurePosixPath:
    """Where an item's image lives, relative to the catalog folder: never built from raw ids or URLs."""
    shard = hashlib.sha256(item_id.encode()).hexdigest()[:2]
    return PurePosixPath("images", shard, f"{hashlib.sha256(url.encode()).hexdigest()}.{ext}")


def check_image(data: bytes, max_pixels: int) -> str:
    """Decode ``data`` fully; return the file extension of its format, or raise ImageRejected."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ImageRejected(f"too many pixels (> {max_pixels})")
            fmt = img.format or ""
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # warning: under -W error
        raise ImageRejected(f"too many pixels (> {max_pixels})") from exc
    except UnidentifiedImageError as exc:  # its message holds an object address: keep statuses stable
        raise ImageRejected("undecodable (not a known image format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"undecodable ({type(exc).__name__}: {exc})") from exc
    return EXTENSIONS.get(fmt, fmt.lower() or "img")


def read_previous(path: Path) -> dict[str, ImageRow]:
    """The rows of an earlier ``images.parquet`` by item id; empty if there is none or it is unreadable."""
    if not path.is_file():
        return {}
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: unreadable (%s); fetching every image again", path, exc)
        return {}
    return {r["item_id"]: ImageRow(r["item_id"], r.get("path"), r.get("sha256"), r["status"]) for r in rows}


def _reusable(prev: ImageRow | None, url: str, catalog_root: Path) -> bool:
    if prev is None or prev.status != OK or not prev.path or not prev.sha256:
        return False
    stored = PurePosixPath(prev.path)
    if stored.stem != hashlib.sha256(url.encode()).hexdigest():  # the URL changed
        return False
    file = catalog_root / stored
    return file.is_file() and file_sha256(file) == prev.sha256


class _Fetcher:
    """Fetches one item's image; shared by the worker threads (httpx.Client is thread-safe)."""

    def __init__(self, catalog_root: Path, params: IngestParams, policy: RetryPolicy, client, root: Path,
                 previous: dict[str, ImageRow], local_root: Path | None) -> None:
        self.catalog_root, self.params, self.policy = catalog_root, params, policy
        self.client, self.root, self.previous = client, root, previous
        self.local_root = local_root

    def __call__(self, item_id: str, url: str | None) -> tuple[ImageRow, bool, int]:
        """The row, whether it was reused, and the bytes downloaded."""
        if not url:
            return ImageRow(item_id, None, None, MISSING), False, 0
        try:
            source = image_source(url, self.local_root, self.root)
        except ImageRefused as exc:
            log.warning("image of %s refused (%s): %s", item_id, url, exc)
            return ImageRow(item_id, None, None, f"{REFUSED}{exc}"), False, 0
        prev = self.previous.get(item_id)
        if _reusable(prev, url, self.catalog_root):
            assert prev is not None
            return prev, True, 0
        try:
            if isinstance(source, Path):
                data = _read_local(source, url, self.params.max_image_bytes)
            else:
                data = fetch_bytes(url, client=self.client, policy=self.policy, root=self.root,
                                   max_bytes=self.params.max_image_bytes)
        except NotFoundError as exc:
            log.info("image of %s missing: %s", item_id, exc)
            return ImageRow(item_id, None, None, MISSING), False, 0
        except TooLargeError as exc:
            return self._failed(item_id, exc.reason, url), False, 0
        except DownloadError as exc:
            return self._failed(item_id, f"network error: {exc.reason}", url), False, 0
        try:
            ext = check_image(data, self.params.max_image_pixels)
        except ImageRejected as exc:
            return self._failed(item_id, str(exc), url), False, len(data)
        relative = image_path(item_id, url, ext)
        write_bytes_atomic(self.catalog_root / relative, data)
        return ImageRow(item_id, relative.as_posix(), hashlib.sha256(data).hexdigest(), OK), False, len(data)

    @staticmethod
    def _failed(item_id: str, reason: str, url: str) -> ImageRow:
        log.warning("image of %s failed (%s): %s", item_id, url, reason)
        return ImageRow(item_id, None, None, f"failed: {reason}")


def fetch_images(
    items: Sequence[tuple[str, str | None]],
    catalog_root: Path,
    table_path: Path,
    params: IngestParams,
    *,
    root: Path = Path("."),
    policy: RetryPolicy | None = None,
    local_root: Path | None = None,
) -> tuple[pa.Table, ImageCounts]:
    """Fetch the image of every ``(item_id, image_url)`` with ``params.concurrency`` threads.

    Args:
        items: one pair per item, in the order the rows should have; a None URL is ``missing``.
        catalog_root: the catalog folder; files go under ``catalog_root/images``.
        table_path: the previous ``images.parquet`` (read, for reuse; the caller writes the new one).
        params: concurrency, retries, timeout, max_image_bytes, max_image_pixels.
        root: where relative ``file:`` URLs start.
        policy: retry policy (default from ``params``).
        local_root: the folder local image files must be in (the local metadata file's folder); None
            refuses every local path (see `image_source`).

    Returns:
        The table (``IMAGES_SCHEMA``, rows in ``items`` order) and its counts.

    Raises:
        StorageError: the disk is full, or an image cannot be written or read for want of permission;
            the remaining downloads are cancelled and nothing is recorded.
    """
    policy = policy or RetryPolicy.from_params(params)
    Image.MAX_IMAGE_PIXELS = params.max_image_pixels  # PIL's own bomb guard agrees with ours
    previous = read_previous(table_path)
    rows: dict[str, ImageRow] = {}
    reused = downloaded = 0
    with make_client(policy, params.concurrency) as client, ThreadPoolExecutor(params.concurrency) as pool:
        fetch = _Fetcher(catalog_root, params, policy, client, root, previous, local_root)
        # each task in a copy of this context: the stage's temp folder (`stage_temp_dir`) reaches the workers
        futures = {pool.submit(contextvars.copy_context().run, fetch, item_id, url): item_id
                   for item_id, url in items}
        done = tqdm(as_completed(futures), total=len(futures), desc="images", unit="img", disable=None)
        for future in done:
            item_id = futures[future]
            try:
                row, was_reused, n_bytes = future.result()
            except OSError as exc:
                if is_storage_error(exc):  # the disk, not the image: stop before every other image fails too
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise storage_error(exc, exc.filename or catalog_root / "images") from exc
                log.warning("image of %s: %s", item_id, exc)
                row, was_reused, n_bytes = ImageRow(item_id, None, None, f"failed: {exc.strerror or exc}"), False, 0
            except Exception as exc:  # a bug on one image must not lose the others
                log.exception("image of %s: unexpected error", item_id)
                row, was_reused, n_bytes = ImageRow(item_id, None, None, f"failed: {exc!r}"), False, 0
            rows[item_id] = row
            reused += was_reused
            downloaded += n_bytes
    ordered = [rows[item_id] for item_id, _ in items]
    table = rows_to_table(ordered)
    statuses = [r.status for r in ordered]
    counts = ImageCounts(
        ok=statuses.count(OK),
        missing=statuses.count(MISSING),
        failed=sum(s.startswith("failed") for s in statuses),
        reused=reused,
        bytes_downloaded=downloaded,
        refused=sum(s.startswith(REFUSED) for s in statuses),
    )
    return table, counts


def rows_to_table(rows: Sequence[ImageRow]) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "item_id": [r.item_id for r in rows],
            "path": [r.path for r in rows],
            "sha256": [r.sha256 for r in rows],
            "status": [r.status for r in rows],
        },
        schema=IMAGES_SCHEMA,
    )


_SHARD = re.compile(r"[0-9a-f]{2}")
_STORED = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{1,5}")


def remove_unreferenced(catalog_root: Path, table: pa.Table) -> int:
    """Delete stored images that ``table`` (the new images.parquet) no longer points at; -> how many.

    Only files of `image_path`'s own layout are touched, so the folder ends up holding exactly the table's
    images (a URL that changed, or a killed run's extra downloads, leave nothing behind).
    """
    images = catalog_root / "images"
    keep = {p for p in table["path"].to_pylist() if p}
    removed = 0
    for shard in (d for d in images.iterdir() if d.is_dir() and _SHARD.fullmatch(d.name)) if images.is_dir() else ():
        for file in shard.iterdir():
            if _STORED.fullmatch(file.name) and f"images/{shard.name}/{file.name}" not in keep:
                file.unlink()
                removed += 1
        with contextlib.suppress(OSError):
            shard.rmdir()  # only when empty
    return removed


def missing_images_table(item_ids: Sequence[str]) -> pa.Table:
    """Every item ``missing``: the table written when the catalog has ``images: false``."""
    return rows_to_table([ImageRow(item_id, None, None, MISSING) for item_id in item_ids])
