"""The recommend stage: the top-k items of every user (or of the listed ones) from the trained model.

    cammsr recommend --catalog demo [--k 20] [--users FILE] [--out PATH]

Serving, not evaluation: each user's whole sequence (train + valid + test items) is the history, and by
default (``recommend.exclude_seen``) the items in it are left out. Users are scored in batches as in
evaluation (full ranking over every item, in history-length order) and each batch is written to the
Parquet file at once, so memory does not grow with the number of users.

New items: with ``recommend.include_new_items`` and a checkpoint that reads text or images, the catalog's
items that the model was not trained on (added to the metadata since, or outside the split's k-core) are
ranked too, when they have features in an active modality: their content goes through the trained projections
and experts (`cammsr.model.io.load_checkpoint`), and their ID row is the weighted mean of those of the
``recommend.new_item_neighbours`` trained items most like them in content (`cammsr.model.content_neighbours`; 0 = the
learned unknown-ID vector). An item with neither interactions nor content is never recommended.

Output ``recommendations.parquet``: user_id (str), rank (int16, 1 = best), item_id (str), score (float32);
the schema metadata holds the model's identity and the checkpoint's sha256.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cammsr.core.atomic import atomic_path
from cammsr.core.config import RecommendParams
from cammsr.core.device import pick_device
from cammsr.core.digest import file_sha256
from cammsr.core.malloc import tune_glibc_malloc
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.data.batches import PackedSequences
from cammsr.data.splits import SplitData, load_splits
from cammsr.evaluate.ranking import model_scores, spans, user_vectors
from cammsr.evaluate.top_k import Exclusions, top_k
from cammsr.model.content_neighbours import impute_new_item_ids
from cammsr.model.io import load_checkpoint, whole_stores
from features.store import read_rows

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("rank", pa.int16(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
])
MAX_LISTED_UNKNOWN = 100  # unknown user ids listed in the summary; the rest are counted
BLOCK_SCORES = 1 << 20  # scores per matmul block (4 MiB of float32): selected from while in cache


@dataclass
class NewItems:
    """Catalog items outside the trained index that the model can rank from their content."""

    item_ids: list[str]
    categories: np.ndarray  # int64 [K] category index in the split's categories; -1 = not among them
    without_content: int  # catalog items outside the index with no features in an active modality


def new_items(split: SplitData, paths: CatalogPaths, modalities: tuple[str, ...]) -> NewItems:
    """Items of the catalog (``items.parquet``) that ``split`` does not index and that have features in
    one of the feature ``modalities`` ("text", "image"), sorted by id."""
    meta = pl.read_parquet(paths.items, columns=["item_id", "category"]).unique("item_id", keep="first")
    outside = meta.filter(~pl.col("item_id").is_in(split.item_ids))
    with_content: set[str] = set()
    for m in modalities:
        rows = read_rows(paths.feature_store(m))
        with_content |= set(rows.item_ids) if rows is not None else set()
    chosen = outside.filter(pl.col("item_id").is_in(sorted(with_content))).sort("item_id")
    cat_of = {c: i for i, c in enumerate(split.category_names)}
    cats = [cat_of.get(c if c is not None else "unknown", -1) for c in chosen["category"].to_list()]
    return NewItems(chosen["item_id"].to_list(), np.array(cats, dtype=np.int64), outside.height - chosen.height)


def with_items(split: SplitData, items: NewItems) -> SplitData:
    """``split`` with ``items`` appended to its item index (the users and sequences are unchanged)."""
    return SplitData(item_ids=split.item_ids + items.item_ids,
                     item_category=np.concatenate([split.item_category, items.categories]),
                     category_names=split.category_names, sequences=split.sequences, user_ids=split.user_ids)


def read_user_list(path: Path) -> list[str]:
    """User ids from a text file (one per line; blank lines and ``#`` comments skipped) or from the
    ``user_id`` column of a Parquet or CSV file; duplicates dropped, first occurrence kept."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: user list not found")
    if path.suffix in (".parquet", ".csv"):
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema=False)
        if "user_id" not in df.columns:
            raise ValueError(f"{path}: expected a user_id column, found {df.columns}")
        ids = [str(u) for u in df["user_id"].to_list() if u is not None]
    else:
        ids = [line.strip() for line in path.read_text().splitlines()]
        ids = [u for u in ids if u and not u.startswith("#")]
    return list(dict.fromkeys(ids))


def batch_table(user_ids: pa.Array, item_ids: pa.Array, users: np.ndarray, values: np.ndarray, cols: np.ndarray
                ) -> pa.Table:
    """Rows of one batch: the finite entries of ``values``/``cols`` [B, k] of the users ``users`` [B]."""
    keep = np.isfinite(values)  # [B, k] -inf = excluded (seen items, padding) when k exceeds what is left
    per_user = keep.sum(1)
    ranks = np.broadcast_to(np.arange(1, values.shape[1] + 1, dtype=np.int16), values.shape)
    return pa.Table.from_arrays([
        user_ids.take(pa.array(np.repeat(users, per_user))),
        pa.array(ranks[keep], pa.int16()),
        item_ids.take(pa.array(cols[keep])),
        pa.array(values[keep].astype(np.float32), pa.float32()),
    ], schema=SCHEMA)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recommend_batch(writer: pq.ParquetWriter, batch: np.ndarray, h: torch.Tensor, items: torch.Tensor, k: int,
                    seen: Exclusions | None, rows_per_block: int, user_ids: pa.Array, item_ids: pa.Array,
                    clock: dict[str, float]) -> int:
    """Top-``k`` of the users ``batch`` (their vectors ``h`` [B, D]) against ``items`` [N+1, D], blocks of
    ``rows_per_block`` users scored and selected from while in cache, written to ``writer``; returns the rows
    written and adds the seconds spent to ``clock``."""
    parts = []
    for sub in range(0, len(batch), rows_per_block):
        t = time.perf_counter()
        scores = h[sub:sub + rows_per_block] @ items.T  # [b, N+1]
        t, clock["score"] = time.perf_counter(), clock["score"] + time.perf_counter() - t
        scores[:, 0] = float("-inf")
        parts.append(top_k(scores, k, seen.take(batch[sub:sub + rows_per_block]) if seen else None))
        clock["select"] += time.perf_counter() - t
    t = time.perf_counter()
    values, cols = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    table = batch_table(user_ids, item_ids, batch, values, cols)
    writer.write_table(table)
    clock["write"] += time.perf_counter() - t
    return table.num_rows


@torch.no_grad()
def run_recommend(name: str, params: RecommendParams, paths: CatalogPaths, device: str = "auto",
                  k: int | None = None, users: Path | None = None, out: Path | None = None) -> StageSummary:
    """Write the top-``k`` (default ``params.k``) items of every user, or of the ``users`` listed in a file,
    to ``out`` (default ``recommendations.parquet``); unknown user ids are counted and listed, not an error.
    """
    t0 = time.perf_counter()
    tune_glibc_malloc()
    k = k if k is not None else params.k
    if not 1 <= k <= np.iinfo(np.int16).max:
        raise ValueError(f"k: expected 1..{np.iinfo(np.int16).max} (rank is an int16), found {k}")
    out = Path(out) if out is not None else paths.recommendations
    dev = pick_device(device)
    split = load_splits(paths.splits_dir)
    trained_cfg = torch.load(paths.checkpoint, map_location="cpu", weights_only=True)["config"]
    content = tuple(m for m in ("text", "image") if trained_cfg.get(f"use_{m}", True)
                    and trained_cfg.get(f"{m}_dim", 0) > 0)
    extra = NewItems([], np.zeros(0, np.int64), 0)
    if params.include_new_items and content:
        extra = new_items(split, paths, content)
    served = with_items(split, extra)
    model, ckpt = load_checkpoint(paths.checkpoint, served, paths, map_location=dev, stores=whole_stores(paths))
    imputed = impute_new_item_ids(model, int(trained_cfg["num_items"]), params.new_item_neighbours)
    model.to(dev).eval()
    # as in evaluation: the item table projected once for the whole pass, float32 scores (they are written)
    scorer = model_scores(model)
    items = scorer.items.to(dev)  # [N+1, D]

    if users is None:
        rows, unknown = np.arange(len(split.user_ids)), []
    else:
        row_of = {u: i for i, u in enumerate(split.user_ids)}
        listed = read_user_list(users)
        unknown = [u for u in listed if u not in row_of]
        rows = np.array([row_of[u] for u in listed if u in row_of], dtype=np.int64)
    max_len = model.cfg.max_seq_len
    rows = rows[np.argsort(lengths_of(split, rows, max_len), kind="stable")]  # less padding, as in evaluation
    user_ids = pa.array(split.user_ids, pa.string())
    item_ids = pa.array(["", *served.item_ids], pa.string())  # column 0 = padding, never recommended

    metadata = {
        "catalog": name, "model": str(ckpt.get("model_name", "?")),
        "model_config": json.dumps(trained_cfg, sort_keys=True), "checkpoint": str(paths.checkpoint),
        "checkpoint_sha256": file_sha256(paths.checkpoint), "best_epoch": str(ckpt.get("epoch", "?")),
        "item_ids_sha256": str(ckpt.get("item_ids_sha256", "")), "k": str(k),
        "exclude_seen": str(params.exclude_seen).lower(), "items_ranked": str(served.num_items),
        "new_items": str(len(extra.item_ids)),
    }
    seen = Exclusions.of(split.sequences) if params.exclude_seen else None  # whole sequences, not the last max_len
    rows_per_block = max(64, BLOCK_SCORES // len(items))
    if items.device.type == "cpu":  # the compiled top-k: compiled or loaded before the timed loop
        from cammsr.evaluate.row_select import warm_up  # numba only in a process that recommends

        warm_up()
    written = 0
    clock = {"score": 0.0, "select": 0.0, "write": 0.0}  # where the loop's time goes
    t_rank = time.perf_counter()
    with atomic_path(out, suffix=".parquet") as tmp, \
            pq.ParquetWriter(tmp, SCHEMA.with_metadata(metadata), compression="zstd") as writer, \
            tqdm(total=len(rows), desc=f"recommend [{name}]", unit="user", mininterval=1.0, disable=None) as bar:
        for span_rows in spans(rows, params.batch_size):
            # as evaluation ranks: the span's user vectors first (runs of similar length), then its top-k
            t = time.perf_counter()
            packed = PackedSequences.of([split.sequences[u][-max_len:] for u in span_rows])
            h_span = user_vectors(scorer.users, packed, np.arange(len(span_rows)), params.batch_size, dev).float()
            clock["score"] += time.perf_counter() - t
            for start in range(0, len(span_rows), params.batch_size):
                written += recommend_batch(writer, span_rows[start:start + params.batch_size],
                                           h_span[start:start + params.batch_size], items, k, seen, rows_per_block,
                                           user_ids, item_ids, clock)
                bar.update(min(params.batch_size, len(span_rows) - start))
    rank_s = time.perf_counter() - t_rank

    n_users = len(rows)
    notes = [f"{n_users} users x top-{k} of {served.num_items} items "
             f"({'seen items excluded' if params.exclude_seen else 'seen items kept'}) -> {out}"]
    if extra.item_ids:
        unseen = int((extra.categories < 0).sum())
        id_rows = (f"ID rows of {imputed} from their {params.new_item_neighbours} nearest trained items in "
                   f"content" if imputed else "unknown-ID vector")
        notes.append(f"{len(extra.item_ids)} items outside the trained index ranked from their content "
                     f"({id_rows})" + (f"; {unseen} of them in a category the model never saw" if unseen
                                               else ""))
    elif not content:
        notes.append("ID-only checkpoint: items outside the trained index cannot be ranked")
    if extra.without_content:
        notes.append(f"{extra.without_content} catalog items outside the trained index have no content: "
                     f"never recommended")
    if unknown:
        shown = ", ".join(unknown[:MAX_LISTED_UNKNOWN])
        more = f" and {len(unknown) - MAX_LISTED_UNKNOWN} more" if len(unknown) > MAX_LISTED_UNKNOWN else ""
        notes.append(f"{len(unknown)} listed user ids are not in the catalog's split: {shown}{more}")
    summary = StageSummary(
        stage="recommend", catalog=name,
        counts={"users": n_users, "unknown_users": len(unknown), "k": k, "rows": written,
                "items": served.num_items, "new_items": len(extra.item_ids),
                "users_per_s": round(n_users / max(rank_s, 1e-9), 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                "loop_s": round(rank_s, 3),
                **{f"{part}_s": round(v, 3) for part, v in clock.items()}},
        seconds=time.perf_counter() - t0, notes=notes,
    )
    if out == paths.recommendations:
        summary.write(paths.summary("recommend"))
    else:
        log.info(summary.line())
        for note in notes:
            log.info("  %s", note)
    return summary


def lengths_of(split: SplitData, users: np.ndarray, max_len: int) -> np.ndarray:
    """History lengths [B] (at most ``max_len``) of the ``users`` rows of ``split``."""
    return np.array([min(len(split.sequences[u]), max_len) for u in users], dtype=np.int64)
