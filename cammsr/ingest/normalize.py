"""Parsed records -> the two Parquet contracts, ``interactions.parquet`` and ``items.parquet``.

The schemas are defined here, once; every later stage reads them. Interactions keep the raw file's
order (the split's stable sort by timestamp keeps it for ties), minus exact duplicates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cammsr.core.atomic import new_temp_file
from cammsr.ingest.download import resolve_reference
from cammsr.ingest.formats import ItemMeta, Review

log = logging.getLogger(__name__)

BATCH_ROWS = 20_000  # rows per Arrow batch while streaming: bounded Python lists (~5 MB), few batches
UNKNOWN_CATEGORY = "unknown"

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # unix seconds
        pa.field("rating", pa.float32()),  # null when the review had none
    ]
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("categories", pa.list_(pa.string()), nullable=False),  # first category path, top first
        pa.field("category", pa.string(), nullable=False),  # the label: categories[category_level]
        pa.field("image_url", pa.string()),  # absolute, or a file: URL / path relative to the project root
    ]
)


@dataclass(frozen=True)
class ItemsStats:
    items_without_meta: int  # reviewed items the metadata file does not describe
    meta_unused: int  # metadata records of items nobody reviewed
    meta_duplicates: int  # later records of an item already described (the first one wins)


@dataclass(frozen=True)
class InteractionsStats:
    rows: int  # interactions written (duplicates dropped)
    duplicates: int  # later reviews with the (user_id, item_id, timestamp) of an earlier one
    users: int  # distinct users
    item_ids: list[str]  # distinct items in order of first appearance


def write_interactions(reviews: Iterable[Review], path: str | Path, batch_rows: int = BATCH_ROWS
                       ) -> InteractionsStats:
    """Stream ``reviews`` into ``INTERACTIONS_SCHEMA`` Parquet at ``path`` (raw order), exact duplicates dropped.

    A duplicate is a later review with the same (user_id, item_id, timestamp) as an earlier one.
    Rows go to disk a batch at a time; what stays in memory is one 64-bit hash per row (8 bytes)
    and the distinct user and item ids. Rows whose hash occurs more than once are compared exactly
    in a second pass over the written file, so a hash collision never drops a review.
    """
    path = Path(path)
    first_pass = new_temp_file(path, ".pass1")  # the mode a plain open() gives, kept through the rename
    hashes: list[np.ndarray] = []
    users: set[str] = set()
    items: dict[str, None] = {}  # insertion-ordered: first appearance
    try:
        with pq.ParquetWriter(first_pass, INTERACTIONS_SCHEMA, compression="zstd") as writer:
            for batch in _review_batches(reviews, batch_rows):
                writer.write_batch(batch)
                hashes.append(_key_hashes(batch))
                users.update(pl.from_arrow(batch.column("user_id")).unique().to_list())
                items.update(dict.fromkeys(pl.from_arrow(batch.column("item_id")).unique(maintain_order=True)))
        row_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        repeated = _repeated(row_hashes)
        if repeated.size == 0:
            os.replace(first_pass, path)
            duplicates = 0
        else:
            duplicates = _copy_without_duplicates(first_pass, path, row_hashes, repeated, batch_rows)
    finally:
        first_pass.unlink(missing_ok=True)
    return InteractionsStats(len(row_hashes) - duplicates, duplicates, len(users), list(items))


def _review_batches(reviews: Iterable[Review], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Reviews -> Arrow record batches of at most ``batch_rows`` rows (bounded Python lists)."""
    columns: dict[str, list] = {name: [] for name in INTERACTIONS_SCHEMA.names}
    for review in reviews:
        columns["user_id"].append(review.user_id)
        columns["item_id"].append(review.item_id)
        columns["timestamp"].append(review.timestamp)
        columns["rating"].append(review.rating)
        if len(columns["user_id"]) >= batch_rows:
            yield _drain(columns, INTERACTIONS_SCHEMA)
    if columns["user_id"]:
        yield _drain(columns, INTERACTIONS_SCHEMA)


def _drain(columns: dict[str, list], schema: pa.Schema) -> pa.RecordBatch:
    """The rows gathered in ``columns`` as one record batch of ``schema``; the lists are emptied for reuse."""
    batch = pa.RecordBatch.from_pydict(columns, schema=schema)
    for values in columns.values():
        values.clear()
    return batch


def _key_hashes(batch: pa.RecordBatch) -> np.ndarray:
    """uint64 hash of each row's (user_id, item_id, timestamp); equal keys give equal hashes."""
    frame = pl.from_arrow(pa.Table.from_batches([batch]).select(["user_id", "item_id", "timestamp"]))
    return frame.select(pl.struct(pl.all()).hash(seed=0)).to_series().to_numpy()


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """Sorted distinct values that occur more than once in ``hashes``."""
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _copy_without_duplicates(source: Path, target: Path, row_hashes: np.ndarray, repeated: np.ndarray,
                             batch_rows: int) -> int:
    """Copy ``source`` to ``target`` minus exact duplicate keys (the first is kept); returns how many were dropped."""
    seen: set[tuple[str, str, int]] = set()  # exact keys of the rows whose hash repeats, only
    dropped = offset = 0
    with pq.ParquetWriter(target, INTERACTIONS_SCHEMA, compression="zstd") as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows):
            suspects = np.flatnonzero(np.isin(row_hashes[offset:offset + len(batch)], repeated))
            offset += len(batch)
            keep = np.ones(len(batch), dtype=bool)
            keys = zip(*(batch.column(c).take(pa.array(suspects)).to_pylist()
                         for c in ("user_id", "item_id", "timestamp")), strict=True)
            for row, key in zip(suspects, keys, strict=True):
                if key in seen:
                    keep[row] = False
                    dropped += 1
                else:
                    seen.add(key)
            writer.write_batch(batch if keep.all() else batch.filter(pa.array(keep)))
    return dropped


def category_label(categories: Sequence[str], level: int) -> str:
    """``categories[level]``, else the deepest level there is, else ``"unknown"``."""
    if not categories:
        return UNKNOWN_CATEGORY
    return categories[level] if level < len(categories) else categories[-1]


def build_items(
    item_ids: Sequence[str], metas: Iterable[ItemMeta], *, category_level: int, meta_url: str | None,
    keep_unreviewed: bool = False,
) -> tuple[pa.Table, ItemsStats]:
    """One row per reviewed item (in ``item_ids`` order), filled from ``metas`` where described.

    Args:
        item_ids: the items of the interactions, in the order the rows should have.
        metas: parsed metadata records (streamed; only reviewed items are kept, as Arrow batches).
        category_level: index into the category path used as the label.
        meta_url: the metadata file's URL; relative image URLs are resolved against it.
        keep_unreviewed: also keep the described items nobody reviewed (yet), after the reviewed ones in
            metadata order: they get features and can be recommended from their content.
    """
    wanted = set(item_ids)
    row_of: dict[str, int] = {}  # item -> its row among the described items, in metadata order
    columns: dict[str, list] = {name: [] for name in ITEMS_SCHEMA.names}
    batches: list[pa.RecordBatch] = []  # described items as Arrow: compact, unlike ItemMeta objects
    unreviewed: list[str] = []  # kept items nobody reviewed, in metadata order
    unused = duplicates = 0
    for meta in metas:
        if meta.item_id not in wanted:
            if meta.item_id not in row_of:
                unused += 1
            if not keep_unreviewed:
                continue
            if meta.item_id not in row_of:
                unreviewed.append(meta.item_id)
        if meta.item_id in row_of:
            duplicates += 1
            continue
        row_of[meta.item_id] = len(row_of)
        categories = list(meta.categories)
        image = meta.image_url
        columns["item_id"].append(meta.item_id)
        columns["title"].append(meta.title)
        columns["description"].append(meta.description)
        columns["brand"].append(meta.brand)
        columns["categories"].append(categories)
        columns["category"].append(category_label(categories, category_level))
        columns["image_url"].append(resolve_reference(meta_url, image) if image and meta_url else image)
        if len(columns["item_id"]) >= BATCH_ROWS:
            batches.append(_drain(columns, ITEMS_SCHEMA))
    batches.append(_drain(columns, ITEMS_SCHEMA))
    described = pa.Table.from_batches(batches, schema=ITEMS_SCHEMA)
    batches.clear()
    order = [*item_ids, *unreviewed]
    rows = described.take(pa.array([row_of.get(item_id) for item_id in order], pa.int64()))  # null: no meta
    del described
    table = pa.Table.from_arrays([
        pa.array(order, pa.string()), rows["title"], rows["description"], rows["brand"],
        pc.fill_null(rows["categories"], pa.scalar([], ITEMS_SCHEMA.field("categories").type)),
        pc.fill_null(rows["category"], UNKNOWN_CATEGORY), rows["image_url"],
    ], schema=ITEMS_SCHEMA)
    stats = ItemsStats(len(item_ids) - (len(row_of) - len(unreviewed)), unused, duplicates)
    return table, stats
