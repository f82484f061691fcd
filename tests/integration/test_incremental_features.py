"""`dvc repro` after editing one item's title re-encodes exactly one text row, and no image.

The copy's demo catalog reads a source folder of its own (``data/sources/edited``, generated
once, then edited by hand like a user would), not the ``demo_source`` stage's output: DVC would
restore an edited stage output by rerunning the generator.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import polars as pl
import pytest

from cammsr.core.config import DemoParams
from demo.generate import META_FILE, REVIEWS_FILE, generate_demo
from features.store import read_rows
from tests.integration.conftest import dvc, make_project_copy
from tests.params_builder import TINY, tiny_params

pytestmark = pytest.mark.slow  # two `dvc repro`s of ingest and both encoders

SOURCE = "data/sources/edited"
STAGES = ("encode_text@demo", "encode_image@demo")


def _summary(root, stage: str) -> dict:
    return json.loads((root / "data/demo/summaries" / f"{stage}.json").read_text())["counts"]


def _edit_one_title(meta_path, asin: str, title: str) -> None:
    """Rewrite the meta line of ``asin`` with a new title; every other line stays byte for byte."""
    lines = gzip.decompress(meta_path.read_bytes()).decode("utf-8").splitlines(keepends=True)
    hits = [k for k, line in enumerate(lines) if f'"{asin}"' in line]
    assert len(hits) == 1, f"{asin} on {len(hits)} meta lines"
    record = json.loads(lines[hits[0]])
    assert record["asin"] == asin
    record["title"] = title
    lines[hits[0]] = json.dumps(record) + "\n"
    meta_path.write_bytes(gzip.compress("".join(lines).encode("utf-8")))


def test_repro_after_one_title_edit_reencodes_one_text_row(tmp_path):
    catalog = {"reviews": f"file:{SOURCE}/{REVIEWS_FILE}", "meta": f"file:{SOURCE}/{META_FILE}", "source_dep": SOURCE}
    params = tiny_params({"demo": catalog}, {"features": {"image": {"model": "ViT-S-32"}}})  # ViT-S: 1/4 the work
    root = make_project_copy(tmp_path / "proj", params)
    generate_demo(root / SOURCE, DemoParams(**TINY["demo"]))

    first = dvc(root, "repro", *STAGES)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    text1 = _summary(root, "encode_text")
    n = text1["total"]
    assert n > 10 and text1["encoded"] == n and text1["reused"] == 0
    images_ok = int((pl.read_parquet(root / "data/demo/images.parquet")["status"] == "ok").sum())
    # no meta, no file, corrupt: no image; the item without meta has no text row either (features.text.require_any)
    assert _summary(root, "encode_image")["encoded"] == images_ok == n - 2
    before = read_rows(root / "data/demo/features/text.parquet")
    image_store = root / "data/demo/features/image.parquet"
    image_before = (image_store.read_bytes(), image_store.stat().st_mtime_ns)
    image_files = {p: p.stat().st_mtime_ns for p in (root / "data/demo/images").rglob("*") if p.is_file()}
    assert len(image_files) == images_ok

    edited = before.item_ids[len(before.item_ids) // 2]
    _edit_one_title(root / SOURCE / META_FILE, edited, "A brand new title for the refresh test")
    second = dvc(root, "repro", *STAGES)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    text2 = _summary(root, "encode_text")
    assert {k: text2[k] for k in ("encoded", "reused", "removed", "failed", "total")} == {
        "encoded": 1, "reused": n - 1, "removed": 0, "failed": 0, "total": n
    }  # fmt: skip
    after = read_rows(root / "data/demo/features/text.parquet")
    assert after.item_ids == before.item_ids
    changed = [i for i in range(n) if not (before.embeddings[i] == after.embeddings[i]).all()]
    assert [after.item_ids[i] for i in changed] == [edited]
    assert [after.item_ids[i] for i in range(n) if after.shas[i] != before.shas[i]] == [edited]
    np.testing.assert_array_equal(np.delete(after.embeddings, changed, 0), np.delete(before.embeddings, changed, 0))

    # the images did not change: ingest reused every one (no file rewritten), wrote the same images.parquet,
    # so DVC skips encode_image and its store is not touched
    assert _summary(root, "ingest")["images_reused"] == images_ok
    assert {p: p.stat().st_mtime_ns for p in image_files} == image_files
    assert "Stage 'encode_image@demo' didn't change, skipping" in second.stdout, second.stdout[-3000:]
    assert (image_store.read_bytes(), image_store.stat().st_mtime_ns) == image_before

    status = dvc(root, "status", *STAGES)
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout
