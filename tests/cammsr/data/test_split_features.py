"""split_features: each store cut to the split's items; an item added to the catalog leaves it byte-identical."""

import json

import numpy as np

from cammsr.core.config import SplitParams
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import load_splits, run_split
from features.store import FeatureRows, load_features, read_rows, write_rows


def _store(paths, modality, ids, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((len(ids), 6)).astype(np.float32)
    write_rows(paths.feature_store(modality), FeatureRows(list(ids), [f"sha-{i}" for i in ids], vectors,
                                                          {"identity": json.dumps({"model": modality})}))
    return dict(zip(ids, vectors, strict=True))


def test_the_cut_holds_the_split_items_in_split_order_with_the_store_metadata(tiny_catalog):
    run_split("tiny", SplitParams(), tiny_catalog)
    items = load_splits(tiny_catalog.splits_dir).item_ids
    store_order = ["zz-extra", *reversed(items[2:])]  # other order, an item outside the split, two missing
    vectors = _store(tiny_catalog, "text", store_order)
    summary = run_split_features("tiny", tiny_catalog)
    cut = read_rows(tiny_catalog.split_features("text"))
    assert cut.item_ids == items[2:] and cut.shas == [f"sha-{i}" for i in items[2:]]
    np.testing.assert_array_equal(cut.embeddings, np.stack([vectors[i] for i in items[2:]]))
    assert cut.metadata["identity"] == json.dumps({"model": "text"})
    feats, present = load_features(tiny_catalog.split_features("text"), items)
    assert present.tolist() == [False, False] + [True] * (len(items) - 2)
    assert summary.counts == {"items": len(items), "text": len(items) - 2, "image": 0}
    assert not tiny_catalog.split_features("image").exists()  # no store: no file, the modality is absent


def test_an_item_added_to_the_store_leaves_the_cut_byte_identical(tiny_catalog):
    run_split("tiny", SplitParams(), tiny_catalog)
    items = load_splits(tiny_catalog.splits_dir).item_ids
    _store(tiny_catalog, "image", items)
    run_split_features("tiny", tiny_catalog)
    before = tiny_catalog.split_features("image").read_bytes()
    rows = read_rows(tiny_catalog.feature_store("image"))
    write_rows(tiny_catalog.feature_store("image"),
               FeatureRows(rows.item_ids + ["brand-new"], rows.shas + ["sha-new"],
                           np.vstack([rows.embeddings, np.ones((1, 6), np.float32)]), rows.metadata))
    run_split_features("tiny", tiny_catalog)
    assert tiny_catalog.split_features("image").read_bytes() == before
