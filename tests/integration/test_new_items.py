"""`dvc repro` after an item is added to the catalog: it is encoded and recommended, and nothing retrains.

The copy's demo catalog reads a source folder of its own (``data/sources/edited``), to which one product
is added by hand, as a catalog's metadata grows between two refreshes: a new asin with a title, categories
and an image, and no reviews (the catalog keeps unreviewed items: ``unreviewed_items: true``).
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import polars as pl

from cammsr.core.config import DemoParams
from demo.generate import META_FILE, generate_demo
from tests.integration.conftest import TINY, dvc, make_project_copy
from tests.params_builder import tiny_params

SOURCE = "data/sources/edited"
TARGETS = ("evaluate@demo", "recommend@demo")
NEW = "B0NEWITEM01"


def _summary(root, stage: str) -> dict:
    return json.loads((root / "data/demo/summaries" / f"{stage}.json").read_text())["counts"]


def _add_product(meta_path, asin: str) -> None:
    """Append a product to the metadata: a copy of the first titled one with an image, under a new asin."""
    lines = gzip.decompress(meta_path.read_bytes()).decode("utf-8").splitlines()
    record = next(r for r in map(json.loads, lines) if r.get("title") and r.get("imageURLHighRes"))
    record.update(asin=asin, title="Brand-new Sparkle Puzzle Cube")
    meta_path.write_bytes(gzip.compress(("\n".join([*lines, json.dumps(record)]) + "\n").encode("utf-8")))


def test_repro_after_adding_an_item_encodes_and_recommends_it_without_retraining(tmp_path):
    catalogs = {
        "demo": {"reviews": f"file:{SOURCE}/reviews_Demo_5.json.gz", "meta": f"file:{SOURCE}/{META_FILE}",
                 "source_dep": SOURCE, "unreviewed_items": True}
    }  # fmt: skip
    params = tiny_params(catalogs, {
        "features": {"image": {"model": "ViT-S-32"}},  # a quarter of ViT-B-32's work; same code path
        "recommend": {"k": 500, "exclude_seen": False},  # every ranked item in every list
    })
    root = make_project_copy(tmp_path / "proj", params)
    generate_demo(root / SOURCE, DemoParams(**TINY["demo"]))

    first = dvc(root, "repro", *TARGETS)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _summary(root, "recommend")
    recs = pl.read_parquet(root / "data/demo/recommendations.parquet")
    assert recs["user_id"].n_unique() == before["users"] == _summary(root, "split")["users"]  # every user
    assert NEW not in recs["item_id"].to_list()
    model = (root / "data/demo/models/model.pt").read_bytes()

    _add_product(root / SOURCE / META_FILE, NEW)
    second = dvc(root, "repro", *TARGETS)
    out = second.stdout
    assert second.returncode == 0, out[-3000:] + second.stderr[-3000:]
    for stage in ("ingest", "encode_text", "encode_image", "recommend"):
        assert f"Running stage '{stage}@demo'" in out, (stage, out[-3000:])
    for stage in ("train", "evaluate"):
        assert f"Stage '{stage}@demo' didn't change, skipping" in out, (stage, out[-3000:])
    assert (root / "data/demo/models/model.pt").read_bytes() == model
    assert _summary(root, "encode_text")["encoded"] == 1 and _summary(root, "encode_image")["encoded"] == 1

    after = _summary(root, "recommend")
    assert after["new_items"] == before["new_items"] + 1 and after["items"] == before["items"] + 1
    recs = pl.read_parquet(root / "data/demo/recommendations.parquet")
    new = recs.filter(pl.col("item_id") == NEW)
    assert new.height == after["users"] and np.isfinite(new["score"].to_numpy()).all()
    status = dvc(root, "status", *TARGETS)  # (demo_source is not used by this copy's catalog)
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout
    print(f"after adding {NEW}: best rank {new['rank'].min()} of {after['items']}; recommend {after}")
