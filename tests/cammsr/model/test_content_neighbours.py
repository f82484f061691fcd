"""ID rows for items a model was not trained on, from their content neighbours among the trained items."""

import torch

from cammsr.model.content_neighbours import IdSmoother, impute_new_item_ids, neighbour_rows
from tests.cammsr.model.test_cammsr import N, make_model

TRAINED = N - 4  # items 1..26 trained, 27..30 new


def _new_items_model(**overrides):
    model = make_model(**overrides).eval()
    model.mark_unknown_ids(torch.arange(N + 1) > TRAINED)
    return model


def _copy_content(model, new: int, source: int, scale: float = 1.0) -> None:
    for m in model.frozen:  # same direction in every modality: cosine 1 with the source
        model.frozen[m].features[new] = model.frozen[m].features[source] * scale
        model.frozen[m].present[new] = model.frozen[m].present[source]


def test_one_neighbour_copies_the_id_row_of_the_most_similar_trained_item():
    model = _new_items_model()
    table = model.id_emb.weight.detach().clone()
    _copy_content(model, 27, 11, scale=3.0)  # cosine ignores the scale
    _copy_content(model, 28, 5)  # item 5 has no text: the image alone decides
    assert impute_new_item_ids(model, TRAINED, neighbours=1) == 4
    assert torch.equal(model.id_emb.weight[27], table[11]) and torch.equal(model.id_emb.weight[28], table[5])
    assert not model.id_unknown.any()  # every new item has content here, so every one got a row
    assert torch.equal(model.id_emb.weight[: TRAINED + 1], table[: TRAINED + 1])  # trained rows untouched
    e = model.item_table("id", torch.tensor([27]))  # the model reads the row, not the unknown vector
    assert torch.equal(e[0], table[11])


def test_several_neighbours_give_a_similarity_weighted_mean():
    model = _new_items_model()
    table = model.id_emb.weight.detach().clone()
    feats = {m: torch.nn.functional.normalize(model.frozen[m].features, dim=1) for m in model.frozen}
    assert impute_new_item_ids(model, TRAINED, neighbours=3, temperature=0.1) == 4
    for new in range(TRAINED + 1, N + 1):  # by hand: mean cosine over the modalities both items have
        sims = []
        for i in range(1, TRAINED + 1):
            shared = [m for m in feats if model.frozen[m].present[new] and model.frozen[m].present[i]]
            sims.append(sum(float(feats[m][new] @ feats[m][i]) for m in shared) / len(shared))
        top = torch.tensor(sims).topk(3)
        w = torch.softmax(top.values / 0.1, dim=0)
        expected = (w[:, None] * table[1 + top.indices]).sum(0)
        assert torch.allclose(model.id_emb.weight[new], expected, atol=1e-6)


def test_items_without_shared_content_and_models_without_ids_or_content_are_left_alone():
    model = _new_items_model(use_image=False)  # text only
    model.frozen["text"].present[27] = False  # a new item without text: nothing to compare
    table = model.id_emb.weight.detach().clone()
    assert impute_new_item_ids(model, TRAINED, neighbours=2) == 3
    assert model.id_unknown.nonzero().squeeze(1).tolist() == [27]
    assert torch.equal(model.id_emb.weight[27], table[27])
    assert impute_new_item_ids(_new_items_model(), TRAINED, neighbours=0) == 0  # 0 = the unknown vector
    assert impute_new_item_ids(_new_items_model(use_text=False, use_image=False), TRAINED, neighbours=3) == 0
    assert impute_new_item_ids(_new_items_model(use_id=False), TRAINED, neighbours=3) == 0
    assert impute_new_item_ids(_new_items_model(), N, neighbours=3) == 0  # nothing new


def test_smoothing_shrinks_rows_towards_their_neighbours_by_training_count():
    model = make_model().eval()
    table = model.id_emb.weight.detach().clone()
    counts = torch.zeros(N + 1)
    counts[1:] = torch.arange(1, N + 1) % 5  # items 5, 10, ... never seen in training: neighbours only
    _copy_content(model, 12, 3)  # item 12's nearest neighbour is item 3 (cosine 1)
    smoother = IdSmoother(model, counts, neighbours=1)
    smoother.apply(2.0)
    c = float(counts[12])
    assert torch.allclose(model.id_emb.weight[12], (c * table[12] + 2.0 * table[3]) / (c + 2.0), atol=1e-6)
    assert torch.equal(model.id_emb.weight[10], smoother.means[10])  # count 0: the neighbours' row
    assert smoother.means[10].abs().sum() > 0 and counts[smoother.means.abs().sum(1) == 0].tolist() == [0.0]
    assert torch.equal(model.id_emb.weight[0], table[0])  # padding untouched
    smoother.apply(0.0)  # back to the trained rows
    assert torch.equal(model.id_emb.weight, table)
    smoother.apply(1e9)  # a huge lambda: every row is its neighbours' mean
    assert torch.allclose(model.id_emb.weight[1:], smoother.means[1:], atol=1e-5)
    # neighbours are items seen in training, never the item itself
    _, found = neighbour_rows(model, torch.tensor([3]), counts > 0, 1)
    assert found.all()
    alone = torch.zeros(N + 1, dtype=torch.bool)
    alone[3] = True
    _, found = neighbour_rows(model, torch.tensor([3]), alone, 1)
    assert not found.any()
    assert IdSmoother.applies(model) and not IdSmoother.applies(make_model(use_id=False))
    assert not IdSmoother.applies(make_model(use_text=False, use_image=False))
