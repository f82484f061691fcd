"""The split_features stage: each feature store cut to the items of the split, in the split's item order.

Train and evaluate read these (``split_features/{text,image}.parquet``), not the whole stores. A feature
refresh that adds items to the catalog changes the stores but not the rows of the split's items, so this
stage reruns, writes the same bytes, and DVC leaves train and evaluate alone; the recommend stage, which
reads the whole stores, reruns and ranks the new items. An edited item of the split changes its row here,
and then training reruns, as it should.

The files keep the stores' schema and metadata (model identity), so `features.store.load_features` reads
them like a store. A store that does not exist gives no file (readers treat the modality as absent).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl

from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.data.splits import ITEMS_FILE
from features.store import FeatureRows, read_rows, write_rows

log = logging.getLogger(__name__)

MODALITIES = ("text", "image")


def cut_to_items(rows: FeatureRows, item_ids: list[str]) -> FeatureRows:
    """The rows of ``item_ids`` that ``rows`` has, in the order of ``item_ids``; metadata kept."""
    row_of = {item_id: i for i, item_id in enumerate(rows.item_ids)}
    pos = np.array([row_of[i] for i in item_ids if i in row_of], dtype=np.int64)
    return FeatureRows([rows.item_ids[p] for p in pos], [rows.shas[p] for p in pos],
                       rows.embeddings[pos] if len(pos) else np.zeros((0, rows.dim), np.float32),
                       dict(rows.metadata))


def run_split_features(name: str, paths: CatalogPaths) -> StageSummary:
    """Write ``split_features/{modality}.parquet`` for every feature store of catalog ``name``."""
    t0 = time.perf_counter()
    items_file = paths.splits_dir / ITEMS_FILE
    if not items_file.exists():
        raise FileNotFoundError(f"{items_file}: not found (run `cammsr split --catalog {name}` first)")
    item_ids = pl.read_parquet(items_file, columns=["item_id", "item_idx"]).sort("item_idx")["item_id"].to_list()
    paths.split_features_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, object] = {"items": len(item_ids)}
    notes = []
    for modality in MODALITIES:
        store, out = paths.feature_store(modality), paths.split_features(modality)
        rows = read_rows(store)
        if rows is None:
            out.unlink(missing_ok=True)
            counts[modality] = 0
            notes.append(f"{modality}: no store at {store}; the modality is absent")
            continue
        cut = cut_to_items(rows, item_ids)
        write_rows(out, cut)
        counts[modality] = len(cut)
        notes.append(f"{modality}: {len(cut)} of {len(item_ids)} split items have features "
                     f"({len(rows) - len(cut)} store rows of items outside the split left out)")
    summary = StageSummary("split_features", name, counts, time.perf_counter() - t0, notes)
    summary.write(paths.summary("split_features"))
    return summary
