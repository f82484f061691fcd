"""cammsr/model/io.py: features aligned to the split's items, category noise, checkpoint round trip.

(Here rather than under tests/cammsr/model/, which holds the network's own tests.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cammsr.core.config import SplitParams, TrainParams
from cammsr.data.batches import pad_right
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import load_splits, run_split
from cammsr.model.io import build_model, load_checkpoint, noisy_categories, padded_features, save_checkpoint
from features.store import FeatureRows, write_rows
from tests.cammsr.conftest import write_tiny_catalog

# ------------------------------------------------------------------------------------------ padded_features

# A store in its own order, with an item ("d") the split does not have.
STORE_IDS = ["b", "a", "d", "c"]
STORE = np.array([[4, 2], [2, 1], [100, 100], [0, 3]], np.float32)
WANTED = ["a", "zz", "c", "b"]  # the split's item order (item_idx 1..4); "zz" has no row in the store


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "text.parquet"
    write_rows(path, FeatureRows(STORE_IDS, ["s"] * 4, STORE))
    return path


def test_rows_follow_the_item_ids_with_padding_and_absent_rows_zero(store):
    feats, present = padded_features(store, WANTED)
    assert feats.dtype == torch.float32 and feats.shape == (5, 2)
    assert feats.tolist() == [[0, 0], [2, 1], [0, 0], [0, 3], [4, 2]]  # row 0 = padding, then a, zz, c, b
    assert present.tolist() == [False, True, False, True, True]


def test_center_l2_by_hand(store):
    # present rows a=(2,1), c=(0,3), b=(4,2): mean (2,2) ("d" is not in the split, so not in the mean)
    # centred a=(0,-1), c=(-2,1), b=(2,0); unit length a=(0,-1), c=(-2,1)/sqrt(5), b=(1,0)
    feats, present = padded_features(store, WANTED, norm="center_l2")
    s5 = np.sqrt(5.0)
    expected = [[0, 0], [0, -1], [0, 0], [-2 / s5, 1 / s5], [1, 0]]
    np.testing.assert_allclose(feats.numpy(), expected, atol=1e-6)
    assert present.tolist() == [False, True, False, True, True]  # absent and padding rows stay exactly zero


def test_center_l2_leaves_a_row_at_the_mean_at_zero_not_nan(tmp_path):
    path = tmp_path / "t.parquet"
    write_rows(path, FeatureRows(["x", "y", "m"], ["s"] * 3, np.array([[1, 0], [-1, 0], [0, 0]], np.float32)))
    feats, _ = padded_features(path, ["x", "y", "m"], norm="center_l2")  # mean (0,0): "m" centres to zero
    assert feats.tolist() == [[0, 0], [1, 0], [-1, 0], [0, 0]]


def test_a_missing_store_gives_width_zero_and_nothing_present(tmp_path):
    feats, present = padded_features(tmp_path / "absent.parquet", ["a", "b"], norm="center_l2")
    assert feats.shape == (3, 0) and present.tolist() == [False, False, False]


# ----------------------------------------------------------------------------------------- noisy_categories

OUT_OF_RANGE = 7  # a label no relabelled item can get (they draw from 0..num_categories-1): changed == chosen


def _marked(n_items: int) -> np.ndarray:
    cats = np.full(n_items + 1, OUT_OF_RANGE, np.int64)
    cats[0] = -1  # padding
    return cats


@pytest.mark.parametrize(("fraction", "chosen"), [(0.25, 10), (0.2, 8), (0.01, 0), (1.0, 40)])
def test_the_fraction_of_items_relabelled_and_the_padding_row_untouched(fraction, chosen):
    cats = _marked(40)
    out = noisy_categories(cats, fraction, num_categories=3, seed=0)[0]
    changed = out[1:] != OUT_OF_RANGE
    assert changed.sum() == chosen  # round(fraction * 40) items, 0.01 * 40 = 0.4 rounds to none
    assert set(out[1:][changed].tolist()) <= {0, 1, 2}
    assert out[0] == -1 and (cats == _marked(40)).all()  # the input is not modified


def test_noise_is_seeded():
    cats = _marked(200)
    a, b = noisy_categories(cats, 0.2, 4, seed=1)[0], noisy_categories(cats, 0.2, 4, seed=1)[0]
    c = noisy_categories(cats, 0.2, 4, seed=2)[0]
    np.testing.assert_array_equal(a, b)
    assert set(np.flatnonzero(a != OUT_OF_RANGE)) != set(np.flatnonzero(c != OUT_OF_RANGE))


def test_real_labels_change_about_one_minus_one_over_c_of_the_chosen():
    rng = np.random.default_rng(0)
    cats = np.concatenate([[-1], rng.integers(0, 4, 4000)])
    out = noisy_categories(cats, 0.5, 4, seed=0)[0]
    # 2000 chosen, each keeps its label with probability 1/4: about 1500 change (sd ~19)
    assert 1400 < (out[1:] != cats[1:]).sum() < 1600
    assert out[0] == -1


def test_the_same_items_get_the_path_of_a_random_item():
    cats = _marked(50)
    paths = np.stack([np.full(3, -1)] + [np.array([0, i, 100 + i]) for i in range(1, 51)])
    labels, noisy = noisy_categories(cats, 0.2, 3, seed=0, item_paths=paths)
    assert np.array_equal(labels, noisy_categories(cats, 0.2, 3, seed=0)[0])  # labels as without paths
    moved = np.flatnonzero((noisy != paths).any(axis=1))
    assert set(moved) <= set(np.flatnonzero(labels != OUT_OF_RANGE))  # only relabelled items move
    assert all(any((noisy[i] == paths[j]).all() for j in range(1, 51)) for i in moved)  # a real item's path
    assert (noisy[0] == -1).all() and len(moved) >= 8  # 10 chosen; a draw of its own path is rare


def test_no_noise_without_a_fraction_or_a_second_category():
    cats = _marked(10)
    for out in (noisy_categories(cats, 0.0, 3, 0)[0], noisy_categories(cats, 0.5, 1, 0)[0]):
        np.testing.assert_array_equal(out, cats)
        assert out is not cats  # always a copy: the caller may write to it


# ----------------------------------------------------------------------------------------- checkpoints

TRAIN = TrainParams(hidden_size=16, num_layers=1, num_heads=1, ffn_size=32, category_noise=0.3)


@pytest.fixture
def catalog(tmp_path):
    """The tiny catalog, split, with text features for every item but two and image features for half."""
    paths = write_tiny_catalog(tmp_path)
    run_split("tiny", SplitParams(), paths)
    split = load_splits(paths.splits_dir)
    rng = np.random.default_rng(0)
    text_ids = split.item_ids[2:]
    write_rows(paths.text_features, FeatureRows(text_ids, ["s"] * len(text_ids),
                                                rng.normal(size=(len(text_ids), 8)).astype(np.float32)))
    image_ids = split.item_ids[::2]
    write_rows(paths.image_features, FeatureRows(image_ids, ["s"] * len(image_ids),
                                                 rng.normal(3.0, 5.0, (len(image_ids), 6)).astype(np.float32)))
    run_split_features("tiny", paths)  # what train and evaluate read: the stores cut to the split
    return paths, split


def _scores(model, split):
    hist, _, _ = split.held_out("test", 50)
    lengths = torch.tensor([len(h) for h in hist])
    return model.eval().score_last(pad_right(hist), lengths)  # [users, N+1]


def _randomise(model, seed):
    """Weights far from the N(0, 0.02) init, so that a model that failed to load would score differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_checkpoint_round_trip_gives_the_same_scores(catalog, tmp_path):
    paths, split = catalog
    model = build_model(TRAIN, SplitParams(), split, paths, seed=0)
    assert model.mods == ("id", "text", "image")
    _randomise(model, 0)
    before = _scores(model, split)
    save_checkpoint(paths.checkpoint, model, epoch=3, feature_norm=TRAIN.feature_norm, model_name="cammsr")
    assert [p.name for p in paths.models_dir.iterdir()] == ["model.pt"]  # written atomically: no temp left

    loaded, ckpt = load_checkpoint(paths.checkpoint, split, paths)
    assert ckpt["epoch"] == 3 and ckpt["model_name"] == "cammsr"
    assert torch.equal(_scores(loaded, split), before)
    # the noised categories are the model's, saved with it, not drawn again from the split
    assert torch.equal(loaded.item_category, model.item_category)
    assert (model.item_category.numpy() != split.item_category).sum() > 0
    for m in ("text", "image"):  # features re-read from the stores, normalised as in training
        assert torch.equal(loaded.frozen[m].features, model.frozen[m].features)
        assert torch.equal(loaded.frozen[m].present, model.frozen[m].present)

    other = build_model(TRAIN, SplitParams(), split, paths, seed=0)
    _randomise(other, 1)
    assert not torch.allclose(_scores(other, split), before)  # the comparison above can tell models apart


def test_a_store_of_another_width_is_an_error_naming_the_checkpoint(catalog):
    paths, split = catalog
    model = build_model(TRAIN, SplitParams(), split, paths, seed=0)
    save_checkpoint(paths.checkpoint, model, feature_norm=TRAIN.feature_norm)
    write_rows(paths.image_features, FeatureRows(split.item_ids[:1], ["s"], np.ones((1, 4), np.float32)))
    run_split_features("tiny", paths)
    with pytest.raises(ValueError, match=r"model\.pt: trained with feature widths text=8 image=6, "
                                         r"stores now give text=8 image=4: retrain"):
        load_checkpoint(paths.checkpoint, split, paths)
