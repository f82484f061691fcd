"""Shared tiny models and catalog writers for the features tests (all offline, all random weights)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cammsr.core.paths import CatalogPaths

TINY_CLIP = "cammsr-test-tiny-vit"  # registered with open_clip by the tiny_clip fixture
WORDS = [
    "wooden",
    "puzzle",
    "toy",
    "blue",
    "red",
    "green",
    "car",
    "doll",
    "game",
    "board",
    "kids",
    "fun",
    "soft",
    "plush",
    "bear",
    "train",
    "track",
    "acme",
    "toys",
    "games",
    "puzzles",
    "vehicles",
    "dolls",
    "a",
    "the",
    "for",
    "and",
    "with",
    "of",
    "piece",
    "set",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub reads HF_HUB_OFFLINE at import, so patch its constant as well as the env."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with a WordPiece vocab of the test words, saved to a dir."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ">", "&", *WORDS]
    # transformers 5 takes the WordPiece vocab as a dict (a ``vocab_file=`` keyword is ignored)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a ~0.2M-parameter open_clip ViT (32x32 images, d=16) and return its name."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return TINY_CLIP


def write_items(paths: CatalogPaths, items: Sequence[dict]) -> None:
    """items.parquet with the ingest contract's columns (missing keys are null)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("item_id", pa.string()),
            ("title", pa.string()),
            ("description", pa.string()),
            ("brand", pa.string()),
            ("categories", pa.list_(pa.string())),
            ("category", pa.string()),
            ("image_url", pa.string()),
        ]
    )
    rows = [{name: item.get(name) for name in schema.names} for item in items]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), paths.items)


def image_bytes(color: tuple[int, int, int], size: int = 40, seed: int = 0) -> bytes:
    """A small PNG: a solid colour plus a little noise so images differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_images(
    paths: CatalogPaths, images: dict[str, bytes | None], status: dict[str, str] | None = None
) -> None:
    """Write image files under images/ and images.parquet; ``None`` bytes = ingest found no image.

    ``status`` overrides the recorded status of an item (e.g. to list a file that is not there).
    """
    paths.images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for item_id, data in images.items():
        if data is None:
            rows.append({"item_id": item_id, "path": None, "sha256": None, "status": "missing"})
            continue
        rel = f"images/{item_id}.png"
        (paths.root / rel).write_bytes(data)
        rows.append(
            {"item_id": item_id, "path": rel, "sha256": hashlib.sha256(data).hexdigest(), "status": "ok"}
        )
    for row in rows:
        row["status"] = (status or {}).get(row["item_id"], row["status"])
    schema = pa.schema(
        [("item_id", pa.string()), ("path", pa.string()), ("sha256", pa.string()), ("status", pa.string())]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), paths.images_table)
