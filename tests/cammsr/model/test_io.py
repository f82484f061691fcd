"""Building CAMMSR from params and a split, and checkpoints that reload the model they saved."""

import numpy as np
import pytest
import torch

from cammsr.core.config import SplitParams, TrainParams
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import load_splits, run_split
from cammsr.model.io import build_model, load_checkpoint, save_checkpoint
from features.store import FeatureRows, write_rows

TRAIN = dict(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, dropout=0.0)


@pytest.fixture
def catalog(tiny_catalog):
    """The tiny catalog split, with text and image stores of offset random vectors (so centring matters)
    cut to the split; the image store lacks two items."""
    run_split("tiny", SplitParams(), tiny_catalog)
    items = load_splits(tiny_catalog.splits_dir).item_ids
    rng = np.random.default_rng(0)
    for modality, dim, ids in (("text", 12, items), ("image", 10, items[2:])):
        vectors = (rng.standard_normal((len(ids), dim)) * 3 + 5).astype(np.float32)
        write_rows(tiny_catalog.features_dir / f"{modality}.parquet",
                   FeatureRows(list(ids), ["x"] * len(ids), vectors, {"modality": modality}))
    run_split_features("tiny", tiny_catalog)
    return tiny_catalog


def _trained(model, split, steps: int = 3):
    """A few optimiser steps, so that the weights differ from their initialisation."""
    seqs = [s for s in split.train_sequences() if len(s) > 2][:16]
    seq = torch.tensor(np.stack([s[:4] for s in seqs]))
    tgt = torch.tensor(np.stack([s[1:5] for s in seqs]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss, _ = model(seq, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), seq


@pytest.mark.parametrize("feature_norm", ["center_l2", "none"])
def test_a_checkpoint_reloads_with_its_feature_norm_and_scores_identically(catalog, feature_norm, tmp_path):
    split = load_splits(catalog.splits_dir)
    train = TrainParams(feature_norm=feature_norm, **TRAIN)
    model, seq = _trained(build_model(train, SplitParams(), split, catalog, seed=0), split)
    assert model.cfg.feature_norm == feature_norm and model.mods == ("id", "text", "image")
    save_checkpoint(tmp_path / "model.pt", model, epoch=3)
    loaded, ckpt = load_checkpoint(tmp_path / "model.pt", split, catalog)
    assert loaded.cfg == model.cfg and ckpt["epoch"] == 3
    for m in ("text", "image"):
        assert torch.equal(loaded.frozen[m].features, model.frozen[m].features)
        assert torch.equal(loaded.frozen[m].present, model.frozen[m].present)
    lengths = torch.full((len(seq),), 4)
    assert torch.equal(loaded.eval().score_last(seq, lengths), model.score_last(seq, lengths))
    norms = model.frozen["text"].features[1:].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms)) == (feature_norm == "center_l2")


def test_an_older_checkpoint_loads_with_its_parameter_names_and_feature_norm(catalog, tmp_path):
    """Before feature_norm joined the config it was saved beside it, and the projections and missing
    vectors were attributes named text_proj, text_missing, image_proj, image_missing."""
    split = load_splits(catalog.splits_dir)
    model, seq = _trained(build_model(TrainParams(**TRAIN), SplitParams(), split, catalog, seed=0), split)
    old_names = {"feature_proj.text.": "text_proj.", "feature_proj.image.": "image_proj.",
                 "missing.text": "text_missing", "missing.image": "image_missing"}
    state = {}
    for key, value in model.state_dict().items():
        new = next((n for n in old_names if key.startswith(n)), None)
        state[old_names[new] + key[len(new):] if new else key] = value
    assert "text_proj.weight" in state and "image_missing" in state
    config = {k: v for k, v in model.cfg.to_dict().items() if k != "feature_norm"}
    torch.save({"state_dict": state, "config": config, "feature_norm": "center_l2"}, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt", split, catalog)
    lengths = torch.full((len(seq),), 4)
    assert loaded.cfg.feature_norm == "center_l2"
    assert torch.equal(loaded.eval().score_last(seq, lengths), model.score_last(seq, lengths))
    torch.save({"state_dict": state, "config": config}, tmp_path / "older.pt")  # before the option: raw features
    assert load_checkpoint(tmp_path / "older.pt", split, catalog)[0].cfg.feature_norm == "none"


def test_train_params_reach_the_model_config(catalog):
    split = load_splits(catalog.splits_dir)
    model = build_model(TrainParams(weight_mode="learned", feature_norm="none", **TRAIN), SplitParams(), split,
                        catalog, seed=0)
    assert (model.cfg.weight_mode, model.cfg.feature_norm) == ("learned", "none")
    assert model.weight_mlp.out_features == 3
    sasrec = build_model(TrainParams(model="sasrec", **TRAIN), SplitParams(), split, catalog, seed=0)
    assert sasrec.mods == ("id",) and sasrec.cfg.feature_norm == "center_l2"
