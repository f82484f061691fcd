"""A tiny catalog with a planted sequential signal, already ingested (interactions + items)."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cammsr.core.paths import CatalogPaths


def write_tiny_catalog(root: Path, n_users: int = 120, n_items: int = 40, length: int = 8, seed: int = 0
                       ) -> CatalogPaths:
    """Users walk item i -> i+1 (mod n_items) with a random start: a model that reads the last item wins."""
    rng = np.random.default_rng(seed)
    users, items, times = [], [], []
    for u in range(n_users):
        start = rng.integers(n_items)
        for t in range(length):
            users.append(f"u{u:04d}")
            items.append(f"i{(start + t) % n_items:03d}")
            times.append(86400 * (t + 1))
    paths = CatalogPaths.of("tiny", root / "data")
    paths.root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"user_id": users, "item_id": items, "timestamp": times,
                  "rating": [5.0] * len(users)}).write_parquet(paths.interactions)
    ids = [f"i{i:03d}" for i in range(n_items)]
    pl.DataFrame({"item_id": ids, "category": [f"c{i % 4}" for i in range(n_items)]}).write_parquet(paths.items)
    return paths


def write_random_features(paths: CatalogPaths, dims: tuple[tuple[str, int], ...] = (("text", 8), ("image", 6)),
                          seed: int = 0) -> None:
    """Random text and image stores for the items of the catalog's split, then the stores cut to the split."""
    from cammsr.data.split_features import run_split_features
    from cammsr.data.splits import load_splits
    from features.store import FeatureRows, write_rows

    items = load_splits(paths.splits_dir).item_ids
    rng = np.random.default_rng(seed)
    for modality, dim in dims:
        write_rows(paths.feature_store(modality), FeatureRows(
            items, ["x"] * len(items), rng.standard_normal((len(items), dim)).astype(np.float32), {}))
    run_split_features(paths.root.name, paths)


@pytest.fixture
def tiny_catalog(tmp_path) -> CatalogPaths:
    return write_tiny_catalog(tmp_path)
