"""Parsed records -> the two Parquet contracts, ``interactions.parquet`` and ``items.parquet``.

The schemas are defined here, once; every later stage reads them. Interactions keep the raw file's
order (the split's stable sort by timestamp keeps it for ties), minus exact duplicates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from cammsr.download import resolve_reference
from cammsr.formats import ItemMeta, Review

log = logging.getLogger(__name__)

BATCH_ROWS = 100_000  # rows per Arrow batch while streaming: bounded Python lists, few batches
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


def build_interactions(reviews: Iterable[Review], batch_rows: int = BATCH_ROWS) -> tuple[pa.Table, int]:
    """Stream ``reviews`` into an interactions table (raw order); drop exact duplicates.

    A duplicate is a later review with the same (user_id, item_id, timestamp) as an earlier one.

    Returns:
        The table (``INTERACTIONS_SCHEMA``) and the number of duplicates dropped.
    """
    batches: list[pa.RecordBatch] = []
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float | None] = []

    def flush() -> None:
        arrays = [pa.array(users, pa.string()), pa.array(items, pa.string()), pa.array(times, pa.int64()),
                  pa.array(ratings, pa.float32())]
        batches.append(pa.RecordBatch.from_arrays(arrays, schema=INTERACTIONS_SCHEMA))
        for column in (users, items, times, ratings):
            column.clear()

    for review in reviews:
        users.append(review.user_id)
        items.append(review.item_id)
        times.append(review.timestamp)
        ratings.append(review.rating)
        if len(users) >= batch_rows:
            flush()
    if users or not batches:
        flush()
    table = pa.Table.from_batches(batches, schema=INTERACTIONS_SCHEMA)
    first = (
        pl.from_arrow(table.select(["user_id", "item_id", "timestamp"]))
        .select(pl.struct("user_id", "item_id", "timestamp").is_first_distinct())
        .to_series()
    )
    duplicates = int((~first).sum())
    if duplicates:
        table = table.filter(pa.array(first.to_numpy()))
    return table.combine_chunks(), duplicates


def item_order(interactions: pa.Table) -> list[str]:
    """Distinct item ids in order of first appearance in ``interactions``."""
    return pl.from_arrow(interactions.select(["item_id"]))["item_id"].unique(maintain_order=True).to_list()


def category_label(categories: Sequence[str], level: int) -> str:
    """``categories[level]``, else the deepest level there is, else ``"unknown"``."""
    if not categories:
        return UNKNOWN_CATEGORY
    return categories[level] if level < len(categories) else categories[-1]


def build_items(
    item_ids: Sequence[str], metas: Iterable[ItemMeta], *, category_level: int, meta_url: str | None
) -> tuple[pa.Table, ItemsStats]:
    """One row per reviewed item (in ``item_ids`` order), filled from ``metas`` where described.

    Args:
        item_ids: the items of the interactions, in the order the rows should have.
        metas: parsed metadata records (streamed; only reviewed items are kept in memory).
        category_level: index into the category path used as the label.
        meta_url: the metadata file's URL; relative image URLs are resolved against it.
    """
    wanted = set(item_ids)
    found: dict[str, ItemMeta] = {}
    unused = duplicates = 0
    for meta in metas:
        if meta.item_id not in wanted:
            unused += 1
        elif meta.item_id in found:
            duplicates += 1
        else:
            found[meta.item_id] = meta
    columns: dict[str, list] = {name: [] for name in ITEMS_SCHEMA.names}
    for item_id in item_ids:
        meta = found.get(item_id)
        categories = list(meta.categories) if meta else []
        image = meta.image_url if meta else None
        columns["item_id"].append(item_id)
        columns["title"].append(meta.title if meta else None)
        columns["description"].append(meta.description if meta else None)
        columns["brand"].append(meta.brand if meta else None)
        columns["categories"].append(categories)
        columns["category"].append(category_label(categories, category_level))
        columns["image_url"].append(resolve_reference(meta_url, image) if image and meta_url else image)
    table = pa.Table.from_pydict(columns, schema=ITEMS_SCHEMA)
    stats = ItemsStats(len(item_ids) - len(found), unused, duplicates)
    return table, stats


def count_distinct(table: pa.Table, column: str) -> int:
    return int(pc.count_distinct(table[column]).as_py())
