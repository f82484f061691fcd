"""Unknown item IDs: the learned vector that stands in for an ID row, item-ID dropout, a grown item table."""

import numpy as np
import pytest
import torch

from cammsr.core.config import SplitParams, TrainParams
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import SplitData, load_splits, run_split
from cammsr.model import ModelConfig
from cammsr.model.io import build_model, grow_state, item_ids_sha256, load_checkpoint, save_checkpoint, whole_stores
from features.store import FeatureRows, read_rows, write_rows
from tests.cammsr.model.test_cammsr import N, make_model

SEQ = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10]])
TGT = torch.tensor([[2, 3, 4, 11, 0, 0], [6, 7, 8, 9, 10, 12]])


def test_marked_items_use_the_unknown_vector_in_sequences_and_in_the_score_table():
    model = make_model().eval()
    with torch.no_grad():
        model.missing["id"].fill_(0.5)
    before = model.score_table().clone()
    unknown = torch.zeros(N + 1, dtype=torch.bool)
    unknown[[0, 4, 9]] = True  # row 0 (padding) is never unknown
    model.mark_unknown_ids(unknown)
    assert model.id_unknown.nonzero().squeeze(1).tolist() == [4, 9]
    e = model.item_table("id", torch.tensor([3, 4, 9]))
    assert torch.equal(e[1], torch.full((16,), 0.5)) and torch.equal(e[2], e[1])
    assert torch.equal(e[0], model.id_emb.weight[3])
    table = model.score_table()  # [N+1, 3d]: the ID part of rows 4 and 9 changed, nothing else
    changed = (table != before).any(1).nonzero().squeeze(1).tolist()
    assert changed == [4, 9] and torch.equal(table[4, :16], torch.full((16,), 0.5))
    assert torch.equal(table[:, 16:], before[:, 16:])


def test_without_id_dropout_nothing_is_drawn_and_the_vector_stays_untrained():
    model = make_model(swap_cl=False).train()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    model.drop_ids()
    assert model._id_dropped is None and torch.equal(torch.get_rng_state(), state)
    loss, _ = model(SEQ, TGT)
    loss.backward()
    assert torch.equal(model.missing["id"].grad, torch.zeros(16))  # in the graph (DDP), but no gradient


def test_id_dropout_replaces_a_fraction_of_ids_in_training_only_and_trains_the_vector():
    model = make_model(id_dropout=0.5, swap_cl=False).train()
    torch.manual_seed(0)
    model.drop_ids()
    dropped = model._id_dropped
    assert not dropped[0] and 0.3 < dropped[1:].float().mean() < 0.7
    with torch.no_grad():
        model.missing["id"].fill_(0.25)
    rows = model.id_rows()
    assert torch.equal(rows[dropped], model.missing["id"].expand(int(dropped.sum()), -1))
    assert torch.equal(rows[~dropped], model.id_emb.weight[~dropped])
    assert torch.equal(model.eval().id_rows(), model.id_emb.weight)  # evaluation sees every ID row
    model.train()
    loss, _ = model(SEQ, TGT)
    loss.backward()
    assert model.missing["id"].grad.abs().sum() > 0


def test_id_dropout_is_checked():
    with pytest.raises(ValueError, match="id_dropout"):
        ModelConfig(num_items=3, num_categories=2, id_dropout=1.0)


def test_grow_state_appends_zero_id_rows_and_new_categories():
    model = make_model()
    cats = np.concatenate([model.item_category.numpy(), [2, -1]])
    grown = grow_state(model.state_dict(), cats)
    assert grown["id_emb.weight"].shape == (N + 3, 16)
    assert torch.equal(grown["id_emb.weight"][: N + 1], model.id_emb.weight)
    assert grown["id_emb.weight"][N + 1:].abs().sum() == 0
    assert grown["item_category"][-2:].tolist() == [2, -1]


def test_grow_state_appends_category_paths_of_new_items_dropping_unseen_tokens():
    # a checkpoint trained with the multi-hot loss over T=3 tokens, paths padded to width 2
    state = {"item_category": torch.tensor([-1, 0, 1]), "item_path": torch.tensor([[-1, -1], [0, 1], [2, -1]])}
    cats = np.array([-1, 0, 1, 1, 0])
    paths = np.array([[-1, -1, -1], [0, 1, -1], [2, -1, -1], [1, 4, 2], [3, 0, -1]])  # token 3, 4: new since
    grown = grow_state(state, cats, paths, num_path_tokens=3)
    assert grown["item_path"].tolist() == [[-1, -1], [0, 1], [2, -1], [1, -1], [-1, 0]]
    assert grown["item_category"].tolist() == [-1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="category path tokens"):
        grow_state(state, cats, None, num_path_tokens=3)


@pytest.fixture
def served(tiny_catalog):
    """A checkpoint of a model trained on the tiny split, and a split with two items appended after it."""
    run_split("tiny", SplitParams(), tiny_catalog)
    split = load_splits(tiny_catalog.splits_dir)
    rng = np.random.default_rng(0)
    ids = split.item_ids + ["new-a", "new-b"]
    for modality, dim in (("text", 12), ("image", 10)):
        vectors = (rng.standard_normal((len(ids), dim)) * 3 + 5).astype(np.float32)
        write_rows(tiny_catalog.feature_store(modality), FeatureRows(ids, ["x"] * len(ids), vectors, {}))
    run_split_features("tiny", tiny_catalog)  # the split's cut: the two new items are left out
    assert len(read_rows(tiny_catalog.split_features("text"))) == split.num_items
    torch.manual_seed(0)
    model = build_model(TrainParams(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, dropout=0.0),
                        SplitParams(), split, tiny_catalog, seed=0).eval()
    save_checkpoint(tiny_catalog.checkpoint, model, item_ids_sha256=item_ids_sha256(split.item_ids))
    grown = SplitData(ids, np.concatenate([split.item_category, [0, 1]]), split.category_names, split.sequences,
                      split.user_ids)
    return tiny_catalog, model, split, grown


def test_a_grown_model_scores_the_trained_items_as_before_and_the_new_ones_by_content(served):
    paths, model, split, grown = served
    big, _ = load_checkpoint(paths.checkpoint, grown, paths, stores=whole_stores(paths))
    big.eval()
    n = split.num_items
    assert big.cfg.num_items == n + 2 and big.id_unknown.nonzero().squeeze(1).tolist() == [n + 1, n + 2]
    for m in ("text", "image"):  # the trained items' features are centred on the same mean as in training
        assert torch.equal(big.frozen[m].features[: n + 1], model.frozen[m].features)
    seq = torch.from_numpy(np.stack([s[-6:] for s in split.sequences[:5]]))
    lengths = torch.full((5,), 6)
    small_scores, big_scores = model.score_last(seq, lengths), big.score_last(seq, lengths)
    assert torch.allclose(big_scores[:, : n + 1], small_scores, atol=1e-5)
    assert torch.isfinite(big_scores[:, n + 1:]).all()
    assert torch.equal(big.item_table("id", torch.tensor([n + 1])), big.missing["id"][None])


def test_a_split_that_is_not_the_trained_one_is_refused(served):
    paths, _, split, grown = served
    shuffled = SplitData(grown.item_ids[1:] + grown.item_ids[:1], grown.item_category, grown.category_names,
                         grown.sequences, grown.user_ids)
    with pytest.raises(ValueError, match="another item index"):
        load_checkpoint(paths.checkpoint, shuffled, paths, stores=whole_stores(paths))
    shorter = SplitData(split.item_ids[:-1], split.item_category[:-1], split.category_names, [], [])
    with pytest.raises(ValueError, match="the split changed since training"):
        load_checkpoint(paths.checkpoint, shorter, paths)


def test_a_checkpoint_from_before_the_unknown_vector_loads_with_zeros(served):
    paths, model, split, grown = served
    ckpt = torch.load(paths.checkpoint, weights_only=True)
    del ckpt["state_dict"]["missing.id"]
    torch.save(ckpt, paths.checkpoint)
    big, _ = load_checkpoint(paths.checkpoint, grown, paths, stores=whole_stores(paths))
    assert torch.equal(big.missing["id"], torch.zeros(16))
    del ckpt["item_ids_sha256"]  # older still: no fingerprint, so it can serve only the items it was trained on
    torch.save(ckpt, paths.checkpoint)
    assert load_checkpoint(paths.checkpoint, split, paths)[0].cfg.num_items == split.num_items
    with pytest.raises(ValueError, match="predates the item-index fingerprint"):
        load_checkpoint(paths.checkpoint, grown, paths, stores=whole_stores(paths))
