"""The splits stage: k-core, item/category index, per-user chronological leave-one-out.

Outputs under ``splits/``:
- ``items.parquet``: item_id, item_idx (1..N; 0 is padding), category, category_idx (0..C-1),
  path_idx (list<int32>: the item's category path as token indices, for the multi-hot category loss)
- ``path_tokens.parquet``: token, token_idx (0..T-1): the category path tokens of the kept items
- ``sequences.parquet``: user_id, user_idx, items (list<int32>), timestamps (list<int64>),
  the whole chronological sequence. Leave-one-out is positional: the last item is the test
  target, the second-to-last the valid target, everything before is training history.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cammsr.core.atomic import write_parquet_atomic
from cammsr.core.config import SplitParams
from cammsr.core.errors import BadInput
from cammsr.data.kcore import kcore
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary

log = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
SEQUENCES_FILE = "sequences.parquet"
PATH_TOKENS_FILE = "path_tokens.parquet"


class SplitError(BadInput, ValueError):
    """The catalog cannot be split as asked (e.g. nothing survives the k-core); names the file."""


def chronological_sequences(interactions: pl.DataFrame) -> pl.DataFrame:
    """One row per user with items and timestamps in time order.

    Amazon timestamps are whole days, so ties are common: the sort is stable on the raw file's
    row order (``_row``), never on hashing or thread scheduling.
    """
    return (
        interactions.with_row_index("_row")
        .sort(["user_id", "timestamp", "_row"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"), pl.col("timestamp"))
    )


def count_ties(timestamps: pl.Series) -> tuple[int, int]:
    """Users whose test (resp. valid) item shares its timestamp with the item before it."""
    test = valid = 0
    for ts in timestamps:
        n = len(ts)
        if n >= 2 and ts[-1] == ts[-2]:
            test += 1
        if n >= 3 and ts[-2] == ts[-3]:
            valid += 1
    return test, valid


def run_split(name: str, params: SplitParams, paths: CatalogPaths) -> StageSummary:
    """Build the item index and the per-user sequences of one catalog."""
    t0 = time.perf_counter()
    inter = pl.read_parquet(paths.interactions, columns=["user_id", "item_id", "timestamp"])
    items_meta = pl.read_parquet(paths.items)
    if "categories" not in items_meta.columns:  # an items table without paths: single labels only
        items_meta = items_meta.with_columns(pl.lit([], dtype=pl.List(pl.String)).alias("categories"))
    items_meta = items_meta.select("item_id", "category", "categories")
    filtered = kcore(inter, params.user_core, params.item_core)
    if filtered.is_empty():
        raise SplitError(
            f"{paths.interactions}: nothing survives the {params.user_core}/{params.item_core}-core filter "
            f"({inter.height} interactions in); a smaller catalog needs its own k-core: catalogs.{name}.min_interactions"
        )

    # Item and category indices sorted by id: stable across runs and independent of row order.
    item_ids = filtered.get_column("item_id").unique().sort()
    item_index = (
        pl.DataFrame({"item_id": item_ids})
        .join(items_meta.unique("item_id", keep="first"), on="item_id", how="left")
        .with_columns(
            pl.col("category").fill_null("unknown"),
            pl.col("categories").fill_null([]),
            pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("item_idx"),
        )
    )
    categories = item_index.get_column("category").unique().sort()
    cat_map = {c: i for i, c in enumerate(categories.to_list())}
    tokens = item_index.get_column("categories").explode().drop_nulls().unique().sort()
    token_map = {c: i for i, c in enumerate(tokens.to_list())}
    item_index = item_index.with_columns(
        pl.col("category").replace_strict(cat_map, return_dtype=pl.Int32).alias("category_idx"),
        pl.col("categories").list.eval(pl.element().replace_strict(token_map, return_dtype=pl.Int32))
        .alias("path_idx"),
    ).select("item_id", "item_idx", "category", "category_idx", "path_idx")

    seqs = chronological_sequences(
        filtered.join(item_index.select("item_id", "item_idx"), on="item_id", how="left", maintain_order="left")
    )
    idx_of = dict(zip(item_index["item_id"].to_list(), item_index["item_idx"].to_list(), strict=True))
    seqs = (
        seqs.sort("user_id")
        .with_columns(
            pl.int_range(0, pl.len(), dtype=pl.Int32).alias("user_idx"),
            pl.col("item_id").list.eval(pl.element().replace_strict(idx_of, return_dtype=pl.Int32)).alias("items"),
        )
        .select("user_id", "user_idx", "items", "timestamp")
        .rename({"timestamp": "timestamps"})
    )
    ties_test, ties_valid = count_ties(seqs.get_column("timestamps"))
    lengths = seqs.get_column("items").list.len()

    paths.splits_dir.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(paths.splits_dir / ITEMS_FILE, item_index.to_arrow())
    write_parquet_atomic(paths.splits_dir / SEQUENCES_FILE, seqs.to_arrow())
    write_parquet_atomic(paths.splits_dir / PATH_TOKENS_FILE,
                         pl.DataFrame({"token": tokens, "token_idx": pl.int_range(0, len(tokens), dtype=pl.Int32,
                                                                                  eager=True)}).to_arrow())
    summary = StageSummary(
        stage="split",
        catalog=name,
        counts={
            "interactions_in": inter.height,
            "interactions": filtered.height,
            "users": seqs.height,
            "items": item_index.height,
            "categories": len(cat_map),
            "path_tokens": len(token_map),
            "mean_length": round(float(lengths.mean()), 2),
            "users_tie_at_test": ties_test,
            "users_tie_at_valid": ties_valid,
        },
        seconds=time.perf_counter() - t0,
        notes=[
            f"{params.user_core}/{params.item_core}-core kept {filtered.height}/{inter.height} interactions",
            f"{ties_test} users have a same-day tie at the test position and {ties_valid} at the valid "
            "position; ties keep the raw file's order (stable sort)",
        ],
    )
    summary.write(paths.summary("split"))
    return summary


@dataclass
class SplitData:
    """In-memory view of ``splits/`` for training and evaluation.

    ``sequences[u]`` is user u's whole chronological sequence of item indices (int64, 1..N).
    """

    item_ids: list[str]
    item_category: np.ndarray  # [N + 1] int64, category_idx per item_idx; row 0 (padding) = -1
    category_names: list[str]
    sequences: list[np.ndarray]
    user_ids: list[str]
    item_paths: np.ndarray | None = None  # [N + 1, D_p] int64 path token indices, -1 padded; row 0 all -1
    path_tokens: list[str] | None = None  # T token names

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_categories(self) -> int:
        return len(self.category_names)

    def held_out(self, part: str, max_len: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Histories, targets and user rows for ``part`` in {"valid", "test"}.

        Users with fewer than 3 interactions have no held-out target and are skipped.
        """
        cut = {"valid": 2, "test": 1}[part]
        rows = [u for u, s in enumerate(self.sequences) if len(s) >= 3]
        hist = [self.sequences[u][: len(self.sequences[u]) - cut][-max_len:] for u in rows]
        targets = np.array([self.sequences[u][len(self.sequences[u]) - cut] for u in rows], dtype=np.int64)
        return hist, targets, np.array(rows, dtype=np.int64)

    def train_sequences(self) -> list[np.ndarray]:
        """Each user's training part: the sequence without its valid and test items."""
        return [s[:-2] if len(s) >= 3 else s for s in self.sequences]


def load_splits(splits_dir: str | Path) -> SplitData:
    """Read the split written by `run_split`."""
    splits_dir = Path(splits_dir)
    items = pl.read_parquet(splits_dir / ITEMS_FILE).sort("item_idx")
    seqs = pl.read_parquet(splits_dir / SEQUENCES_FILE).sort("user_idx")
    cats = items.select("category", "category_idx").unique().sort("category_idx")
    item_category = np.full(items.height + 1, -1, dtype=np.int64)
    item_category[items["item_idx"].to_numpy()] = items["category_idx"].to_numpy()
    lengths = seqs.get_column("items").list.len().to_numpy().astype(np.int64)
    flat = seqs.get_column("items").explode().to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sequences = [flat[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
    item_paths, path_tokens = None, None
    if "path_idx" in items.columns and (splits_dir / PATH_TOKENS_FILE).exists():
        paths_list = items["path_idx"].to_list()
        item_paths = np.full((items.height + 1, max((len(p) for p in paths_list), default=0) or 1), -1, np.int64)
        for row, path in zip(items["item_idx"].to_list(), paths_list, strict=True):
            item_paths[row, : len(path)] = path
        path_tokens = pl.read_parquet(splits_dir / PATH_TOKENS_FILE).sort("token_idx")["token"].to_list()
    return SplitData(
        item_ids=items["item_id"].to_list(),
        item_category=item_category,
        category_names=cats["category"].to_list(),
        sequences=sequences,
        user_ids=seqs["user_id"].to_list(),
        item_paths=item_paths,
        path_tokens=path_tokens,
    )
