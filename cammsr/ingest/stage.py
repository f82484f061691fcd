"""The ingest stage: raw source URLs -> raw/ + interactions.parquet + items.parquet + images.parquet.

    cammsr ingest --catalog demo        |   dvc repro ingest@demo

1. download the reviews (and metadata) file into ``raw/`` (conditional, resumable; `cammsr.ingest.download`);
2. parse them in one streaming pass each, whatever the Amazon format (`cammsr.ingest.formats`), sending bad
   lines to ``quarantine.jsonl`` (`cammsr.ingest.quarantine`), and fail if a file has too many;
3. normalize to the Parquet contracts (`cammsr.ingest.normalize`);
4. fetch one image per item (`cammsr.ingest.images`);
5. return (and write) a `StageSummary` with the counts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cammsr.core.atomic import atomic_path, write_parquet_atomic
from cammsr.core.config import CatalogParams, IngestParams
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.ingest.download import FetchResult, RetryPolicy, download_sources
from cammsr.ingest.formats import SourceReader
from cammsr.ingest.images import fetch_images, missing_images_table
from cammsr.ingest.normalize import build_items, write_interactions
from cammsr.ingest.quarantine import Quarantine, check_fraction

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """The catalog's sources cannot give any interactions; the message names the file."""


def run_ingest(
    name: str,
    catalog: CatalogParams,
    params: IngestParams,
    paths: CatalogPaths,
    root: Path = Path("."),
    *,
    policy: RetryPolicy | None = None,
) -> StageSummary:
    """Ingest catalog ``name``: download, parse, normalize, fetch images; write the stage summary.

    Args:
        name: the catalog's key in params.yaml (used in logs and the summary).
        catalog: its URLs (``file:`` relative to ``root``, ``file:///abs``, plain paths or http(s)).
        params: the ``ingest`` section.
        paths: where the artifacts go.
        root: the project root that relative ``file:`` URLs start from.
        policy: retry/backoff override (tests use a tiny backoff); default from ``params``.

    Raises:
        DownloadError: a source could not be fetched (names the URL).
        FormatError: a source is not a recognisable Amazon file of its kind.
        QuarantineLimitError: a file had more malformed records than ``max_quarantine_fraction``
            (raised after ``quarantine.jsonl`` is written).
        IngestError: no valid review at all.
    """
    started = time.perf_counter()
    root = Path(root)
    policy = policy or RetryPolicy.from_params(params)
    fetched = download_sources(catalog.source_urls(), paths.raw_dir, paths.manifest, policy=policy,
                               concurrency=params.concurrency, root=root)
    reviews_file, meta_file = fetched[0], (fetched[1] if catalog.meta else None)
    notes: list[str] = []

    # Interactions stream straight to disk; the file replaces the old one only once every check passed.
    with atomic_path(paths.interactions, suffix=".parquet") as staged:
        with Quarantine(paths.quarantine) as quarantine:
            reviews = SourceReader(reviews_file.path, "reviews", quarantine, _label(reviews_file, paths))
            notes.append(f"reviews: {catalog.reviews} ({reviews.format or 'no valid record'})")
            interactions = write_interactions(reviews, staged)
            lines = {reviews.file: reviews.lines}  # records read per file, for the quarantine ceiling
            item_ids = interactions.item_ids
            meta_lines = 0
            if meta_file is not None:
                metas = SourceReader(meta_file.path, "meta", quarantine, _label(meta_file, paths))
                notes.append(f"meta: {catalog.meta} ({metas.format or 'no valid record'})")
                items, stats = build_items(item_ids, metas, category_level=params.category_level,
                                           meta_url=catalog.meta, keep_unreviewed=catalog.unreviewed_items)
                meta_lines = lines[metas.file] = metas.lines
            else:
                items, stats = build_items(item_ids, [], category_level=params.category_level, meta_url=None)
                notes.append("meta: none (every item has null metadata and category 'unknown')")
        check_fraction(quarantine.counts, lines, params.max_quarantine_fraction, paths.quarantine)
        if interactions.rows == 0:
            raise IngestError(f"{catalog.reviews}: no valid review in {reviews.lines} records "
                              f"(see {paths.quarantine})")
    write_parquet_atomic(paths.items, items)

    image_urls = list(zip(items["item_id"].to_pylist(), items["image_url"].to_pylist(), strict=True))
    if catalog.images:
        images, image_counts = fetch_images(image_urls, paths.root, paths.images_table, params, root=root,
                                            policy=policy)
        ok, missing, failed = image_counts.ok, image_counts.missing, image_counts.failed
        reused, image_bytes = image_counts.reused, image_counts.bytes_downloaded
    else:
        images = missing_images_table(items["item_id"].to_pylist())
        ok, missing, failed, reused, image_bytes = 0, items.num_rows, 0, 0, 0
        notes.append("images: false in the catalog, every item's image is 'missing'")
    write_parquet_atomic(paths.images_table, images)
    paths.images_dir.mkdir(parents=True, exist_ok=True)  # a declared DVC out, even when no image exists

    summary = StageSummary(
        stage="ingest",
        catalog=name,
        counts={
            "reviews_lines": reviews.lines,
            "interactions": interactions.rows,
            "duplicates_dropped": interactions.duplicates,
            "users": interactions.users,
            "items": items.num_rows,
            "unreviewed_items": items.num_rows - len(item_ids),
            "items_without_meta": stats.items_without_meta,
            "meta_lines": meta_lines,
            "meta_unused": stats.meta_unused,
            "meta_duplicates": stats.meta_duplicates,
            "quarantined": quarantine.total,
            "quarantined_by_file": {file: quarantine.counts.get(file, 0) for file in lines},
            "images_ok": ok,
            "images_missing": missing,
            "images_failed": failed,
            "images_reused": reused,
            "bytes_downloaded": sum(f.bytes_transferred for f in fetched) + image_bytes,
            "files_unchanged": sum(not f.changed for f in fetched),
        },
        seconds=round(time.perf_counter() - started, 3),
        notes=notes,
    )
    summary.write(paths.summary("ingest"))
    return summary


def _label(result: FetchResult, paths: CatalogPaths) -> str:
    """How the quarantine names a raw file: relative to the catalog folder when it is inside it."""
    try:
        return result.path.relative_to(paths.root).as_posix()
    except ValueError:
        return str(result.path)
