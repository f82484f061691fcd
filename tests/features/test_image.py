"""features/image.py + encode_image: decoding, failures, values, upsert, the aligned reader."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cammsr.core.config import ImageFeatureParams
from cammsr.core.paths import CatalogPaths
from features.encode import encode_image
from features.image import RANDOM_INIT_SEED, ImageEncoder
from features.store import load_features, read_rows
from tests.features.conftest import image_bytes, write_images, write_items

COLORS = {"i0": (200, 30, 30), "i1": (30, 200, 30), "i2": (30, 30, 200), "i3": (200, 200, 30)}


def params(model: str, **kw) -> ImageFeatureParams:
    return ImageFeatureParams(model=model, batch_size=2, **kw)


@pytest.fixture
def catalog(tmp_path) -> CatalogPaths:
    """i0-i2 good; i3 changed on disk after ingest; i4 not an image; i5 listed but deleted;
    i6 ingest found no image; i7 absent from images.parquet."""
    paths = CatalogPaths.of("toys", tmp_path)
    write_items(paths, [{"item_id": f"i{k}", "title": f"item {k}"} for k in range(8)])
    images = {item: image_bytes(color, seed=k) for k, (item, color) in enumerate(COLORS.items())}
    write_images(paths, {**images, "i4": b"definitely not a PNG", "i5": image_bytes((0, 0, 0)), "i6": None})
    (paths.root / "images/i3.png").write_bytes(image_bytes((1, 2, 3)))
    (paths.root / "images/i5.png").unlink()
    return paths


def reference_embedding(model_name: str, path) -> np.ndarray:
    """The same seeded random model, one image, no DataLoader: what the store must hold."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    with torch.no_grad():
        x = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
        return model.eval().encode_image(x)[0].numpy()


def test_encode_image_records_failures_and_stores_the_rest(catalog, tiny_clip, caplog):
    with caplog.at_level(logging.WARNING):
        summary = encode_image("toys", params(tiny_clip), catalog, device="cpu")
    assert "RANDOM-weight" in caplog.text
    counts = summary.counts
    assert (counts["encoded"], counts["failed"], counts["no_image"], counts["total"], counts["dim"]) == (
        3,
        3,
        1,  # i6; i7 has no images.parquet row, and the stage takes its items from that table
        3,
        16,
    )
    notes = "\n".join(summary.notes)
    assert "failed: 1 sha256 mismatch, 1 cannot decode, 1 file not found" in notes
    assert "i3: sha256 mismatch" in notes and "i4: cannot decode" in notes and "i5: file not found" in notes

    rows = read_rows(catalog.image_features)
    assert rows.item_ids == ["i0", "i1", "i2"]
    assert rows.shas == [pq.read_table(catalog.images_table).column("sha256")[k].as_py() for k in range(3)]
    for k, item in enumerate(rows.item_ids):
        expected = reference_embedding(tiny_clip, catalog.root / f"images/{item}.png")
        np.testing.assert_allclose(rows.embeddings[k], expected, atol=1e-5)  # not normalised
    meta = rows.metadata
    assert (meta["modality"], meta["model"], meta["pretrained"], meta["dim"]) == (
        "image",
        tiny_clip,
        "",
        "16",
    )
    assert meta["random_init_seed"] == "0" and "open_clip_version" in meta and "torch_version" in meta

    features, present = load_features(catalog.image_features, ["i5", "i2", "i6", "i0", "i9"])
    np.testing.assert_array_equal(present, [False, True, False, True, False])
    np.testing.assert_array_equal(features[[1, 3]], rows.embeddings[[2, 0]])
    assert not features[[0, 2, 4]].any()


def test_rerun_encodes_only_changed_images(catalog, tiny_clip, monkeypatch):
    encode_image("toys", params(tiny_clip), catalog, device="cpu")
    first = read_rows(catalog.image_features)
    seen: list[str] = []
    real = ImageEncoder.encode

    def counting(self, jobs, progress=None):
        seen.extend(job.path.name for job in jobs)
        return real(self, jobs, progress)

    monkeypatch.setattr(ImageEncoder, "encode", counting)
    write_images(catalog, {"i0": image_bytes(COLORS["i0"], seed=0), "i1": image_bytes((9, 9, 9)), "i2": None})
    summary = encode_image("toys", params(tiny_clip), catalog, device="cpu")

    assert seen == ["i1.png"]  # i0 unchanged, i2 lost its image, the rest left images.parquet
    assert (summary.counts["encoded"], summary.counts["reused"], summary.counts["removed"]) == (1, 1, 1)
    rows = read_rows(catalog.image_features)
    assert rows.item_ids == ["i0", "i1"]
    np.testing.assert_array_equal(rows.embeddings[0], first.embeddings[0])
    assert not np.allclose(rows.embeddings[1], first.embeddings[1])


def test_pixel_limit_is_a_recorded_failure_also_with_workers(tmp_path, tiny_clip):
    paths = CatalogPaths.of("big", tmp_path)
    write_items(paths, [{"item_id": "small"}, {"item_id": "big"}])
    write_images(
        paths, {"small": image_bytes((10, 10, 10), size=20), "big": image_bytes((10, 10, 10), size=40)}
    )
    summary = encode_image(
        "big", params(tiny_clip, num_workers=1), paths, device="cpu", max_image_pixels=1000
    )
    assert (summary.counts["encoded"], summary.counts["failed"]) == (1, 1)
    notes = "\n".join(summary.notes)
    assert "failed: 1 too many pixels" in notes
    assert "big: too many pixels: " in notes and "40x40 > max_image_pixels=1000" in notes
    assert read_rows(paths.image_features).item_ids == ["small"]


def test_catalog_without_images_writes_an_empty_store(tmp_path, tiny_clip):
    paths = CatalogPaths.of("bare", tmp_path)
    write_items(paths, [{"item_id": "a"}, {"item_id": "b"}])
    write_images(paths, {"a": None, "b": None})
    summary = encode_image("bare", params(tiny_clip), paths, device="cpu")
    assert (summary.counts["total"], summary.counts["no_image"], summary.counts["dim"]) == (0, 2, 16)
    features, present = load_features(paths.image_features, ["a", "b"])
    assert features.shape == (2, 0) and not present.any()


def test_missing_images_table_names_the_file(tmp_path, tiny_clip):
    paths = CatalogPaths.of("noingest", tmp_path)
    write_items(paths, [{"item_id": "a"}])
    with pytest.raises(FileNotFoundError, match="images.parquet"):
        encode_image("noingest", params(tiny_clip), paths, device="cpu")


def test_large_jpegs_are_decoded_at_reduced_scale_to_nearly_the_same_pixels(tmp_path, monkeypatch):
    import hashlib
    import io

    import open_clip
    from PIL import JpegImagePlugin

    from features.image import ImageJob, decode_image

    transform = open_clip.image_transform(32, is_train=False)  # what a 32-pixel model gets
    y, x = np.mgrid[0:400, 0:480]
    pixels = np.stack([x * 255 // 480, y * 255 // 400, (x + y) * 255 // 880], -1).astype(np.uint8)
    jobs = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        path = tmp_path / f"big.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        jobs[fmt] = ImageJob(0, path, hashlib.sha256(buf.getvalue()).hexdigest())
    drafts: list[tuple] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size))  # fmt: skip

    full = decode_image(jobs["JPEG"], transform, 10**8)
    assert drafts == []
    fast = decode_image(jobs["JPEG"], transform, 10**8, min_side=32)
    assert drafts == [(39, 32)]  # short side 400 -> 32: scale 0.08, 480 * 0.08 = 38.4 -> 39
    assert fast.pixels.shape == full.pixels.shape == (3, 32, 32)
    assert (fast.pixels - full.pixels).abs().max() < 0.05  # normalised units (pixel std ~0.9); seen: 0.015
    decode_image(jobs["PNG"], transform, 10**8, min_side=32)
    assert drafts == [(39, 32)]  # PNG has no reduced-scale decoding

    truncated = tmp_path / "cut.jpg"
    data = jobs["JPEG"].path.read_bytes()[:3000]
    truncated.write_bytes(data)
    broken = decode_image(ImageJob(1, truncated, hashlib.sha256(data).hexdigest()), transform, 10**8, min_side=32)
    assert broken.pixels is None and broken.error.startswith("cannot decode: ")
