"""The ingest stage: raw source URLs -> raw/ + interactions.parquet + items.parquet + images.parquet.

    cammsr ingest --catalog demo        |   dvc repro ingest@demo

1. download the reviews (and metadata) file into ``raw/`` (conditional, resumable; `cammsr.ingest.download`);
2. parse them in one streaming pass each, whatever the Amazon format (`cammsr.ingest.formats`), sending bad
   lines to ``quarantine.jsonl`` (`cammsr.ingest.quarantine`), and fail if a file has too many;
3. normalize to the Parquet contracts (`cammsr.ingest.normalize`);
4. fetch one image per item (`cammsr.ingest.images`);
5. return (and write) a `StageSummary` with the counts.

The three tables are staged in the stage's temp folder (``.tmp/ingest/``, cleared by the next run) and
replace the previous ones only once everything succeeded: a run that stops (bad input, full disk,
killed) leaves the previous outputs as they were.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq

from cammsr.core.atomic import atomic_path, stage_temp_dir, write_json_atomic
from cammsr.core.config import CatalogParams, IngestParams
from cammsr.core.errors import BadInput
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.ingest.download import FetchResult, RetryPolicy, download_sources, local_path
from cammsr.ingest.formats import SourceReader, TimestampWindow
from cammsr.ingest.images import fetch_images, missing_images_table, remove_unreferenced
from cammsr.ingest.normalize import build_items, write_interactions
from cammsr.ingest.quarantine import Quarantine, check_fraction

log = logging.getLogger(__name__)


class IngestError(BadInput, RuntimeError):
    """The catalog's sources cannot give any interactions; the message names the file."""


def image_root(catalog: CatalogParams, root: Path) -> Path | None:
    """The folder local image files may come from: the metadata file's own, when that file is local."""
    if not catalog.meta:
        return None
    meta = local_path(catalog.meta, root)
    return meta.parent if meta is not None else None


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
    root = Path(root)
    with stage_temp_dir(paths.tmp_dir("ingest")):
        return _ingest(name, catalog, params, paths, root, policy or RetryPolicy.from_params(params))


def _ingest(name: str, catalog: CatalogParams, params: IngestParams, paths: CatalogPaths, root: Path,
            policy: RetryPolicy) -> StageSummary:
    started = time.perf_counter()
    fetched = download_sources(catalog.source_urls(), paths.raw_dir, paths.manifest, policy=policy,
                               concurrency=params.concurrency, root=root)
    reviews_file, meta_file = fetched[0], (fetched[1] if catalog.meta else None)
    window = TimestampWindow.from_params(params.min_review_date, params.max_days_ahead)
    notes: list[str] = []

    # Every table is staged; they replace the old ones together, once every check passed and the images
    # are in (leaving the stack renames them; an exception on the way deletes them instead).
    with contextlib.ExitStack() as outputs:
        staged_interactions = outputs.enter_context(atomic_path(paths.interactions, suffix=".parquet"))
        staged_items = outputs.enter_context(atomic_path(paths.items, suffix=".parquet"))
        staged_images = outputs.enter_context(atomic_path(paths.images_table, suffix=".parquet"))
        with Quarantine(paths.quarantine) as quarantine:
            reviews = SourceReader(reviews_file.path, "reviews", quarantine, _label(reviews_file, paths),
                                   timestamps=window, source=catalog.reviews)
            notes.append(f"reviews: {catalog.reviews} ({reviews.format or 'no valid record'})")
            interactions = write_interactions(reviews, staged_interactions)
            lines = {reviews.file: reviews.lines}  # records read per file, for the quarantine ceiling
            item_ids = interactions.item_ids
            meta_lines = 0
            if meta_file is not None:
                metas = SourceReader(meta_file.path, "meta", quarantine, _label(meta_file, paths), source=catalog.meta)
                notes.append(f"meta: {catalog.meta} ({metas.format or 'no valid record'})")
                items, stats = build_items(item_ids, metas, category_level=params.category_level,
                                           meta_url=catalog.meta, keep_unreviewed=catalog.unreviewed_items)
                meta_lines = lines[metas.file] = metas.lines
            else:
                items, stats = build_items(item_ids, [], category_level=params.category_level, meta_url=None)
                notes.append("meta: none (every item has null metadata and category 'unknown')")
        if reviews.out_of_window:
            notes.append(f"{reviews.out_of_window} reviews quarantined for a time outside "
                         f"{params.min_review_date} .. now + {params.max_days_ahead:g} days")
        check_fraction(quarantine.counts, lines, params.max_quarantine_fraction, paths.quarantine,
                       quarantine.first)
        if interactions.rows == 0:
            what = "is empty (no records)" if reviews.lines == 0 else f"has no valid review in {reviews.lines} records"
            raise IngestError(f"{catalog.reviews}: {what} (see {paths.quarantine})")
        pq.write_table(items, staged_items, compression="zstd")

        image_urls = list(zip(items["item_id"].to_pylist(), items["image_url"].to_pylist(), strict=True))
        refused = 0
        if catalog.images:
            images, image_counts = fetch_images(image_urls, paths.root, paths.images_table, params, root=root,
                                                policy=policy, local_root=image_root(catalog, root))
            ok, missing, failed = image_counts.ok, image_counts.missing, image_counts.failed
            reused, image_bytes, refused = image_counts.reused, image_counts.bytes_downloaded, image_counts.refused
            if refused:
                notes.append(f"{refused} image URLs refused: only http(s), or files in the local metadata's folder")
        else:
            images = missing_images_table(items["item_id"].to_pylist())
            ok, missing, failed, reused, image_bytes = 0, items.num_rows, 0, 0, 0
            notes.append("images: false in the catalog, every item's image is 'missing'")
        pq.write_table(images, staged_images, compression="zstd")
    removed = remove_unreferenced(paths.root, images)  # after the new table is in place
    if removed:
        notes.append(f"{removed} stored images no longer referenced were removed")
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
            "out_of_window": reviews.out_of_window,
            "images_ok": ok,
            "images_missing": missing,
            "images_failed": failed,
            "images_refused": refused,
            "images_reused": reused,
            "bytes_downloaded": sum(f.bytes_transferred for f in fetched) + image_bytes,
            "files_unchanged": sum(not f.changed for f in fetched),
        },
        seconds=round(time.perf_counter() - started, 3),
        notes=notes,
    )
    # last, with the tables: a failed ingest leaves the record of the previous files beside the previous tables
    write_json_atomic(paths.precomputed_sources, precomputed_record(catalog, fetched))
    summary.write(paths.summary("ingest"))
    return summary


def precomputed_record(catalog: CatalogParams, fetched: list[FetchResult]) -> dict[str, dict | None]:
    """``{modality: {file, sha256, index, index_sha256, format, provenance} or None}``: the precomputed
    feature files and their content hashes, so an encode stage reruns when, and only when, its own file
    (not the reviews or metadata) changed."""
    sha = {f.entry.url: f.entry.sha256 for f in fetched}
    out: dict[str, dict | None] = {}
    for modality in ("text", "image"):
        source = catalog.precomputed(modality)
        out[modality] = None if source is None else {
            "file": source.file, "sha256": sha[source.file], "index": source.index,
            "index_sha256": sha.get(source.index) if source.index else None, "format": source.format,
            "provenance": source.provenance}
    return out


def _label(result: FetchResult, paths: CatalogPaths) -> str:
    """How the quarantine names a raw file: relative to the catalog folder when it is inside it."""
    try:
        return result.path.relative_to(paths.root).as_posix()
    except ValueError:
        return str(result.path)
