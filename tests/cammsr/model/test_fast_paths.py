"""Main's model switches on the faster training paths: the tables projected once per batch (with the unknown-ID
vector and item-ID dropout), the swap views' final block at one position, bfloat16 autocast."""

from __future__ import annotations

import pytest
import torch

from tests.cammsr.model.test_cammsr import make_model

SEQ = torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 10, 11, 12, 13], [14, 5, 7, 0, 0, 0, 0, 0]])
TGT = torch.tensor([[2, 3, 4, 5, 6, 0, 0, 0], [7, 8, 9, 10, 11, 12, 13, 14], [5, 7, 15, 0, 0, 0, 0, 0]])
SWITCHES = [{}, {"content_table": "frozen"}, {"score_refined": True}, {"modality_dropout": 0.4},
            {"id_dropout": 0.3}, {"shared_encoder": False}, {"score_scale": "learned"}, {"weight_temperature": 0.5},
            {"score_refined": True, "content_table": "frozen"}]


def _loss(model, seed, bf16=False):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, parts = model(SEQ, TGT)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", SWITCHES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_parameter_trains_and_bfloat16_follows_float32(overrides):
    model = make_model(**overrides).train()
    loss, grads = _loss(model, 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(grads)
    if not overrides.get("id_dropout"):
        missing.discard("missing.id")  # the unknown-ID vector trains only with item-ID dropout (zero grad else)
    assert not missing, f"parameters without a gradient: {sorted(missing)}"  # DDP needs every one used
    low, low_grads = _loss(model, 0, bf16=True)
    assert abs(low.item() - loss.item()) < 2e-2 * loss.item()
    flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
    flat_low = torch.cat([low_grads[n].flatten() for n in sorted(grads)])
    assert ((flat_low - flat).norm() / flat.norm()).item() < 0.1


def test_item_id_dropout_reaches_the_score_table_and_the_sequences():
    model = make_model(id_dropout=0.5).train()
    _, grads = _loss(model, 0)
    assert grads["missing.id"].abs().sum() > 0  # the unknown vector stood in for dropped IDs
    model.eval()
    assert torch.equal(model.id_rows(), model.id_emb.weight)  # nothing dropped at evaluation


def test_swap_views_at_one_position_equal_the_full_encoding():
    """The contrastive loss reads the swap views at the last target; encoding them only there is exact."""
    model = make_model().train()
    last = (TGT > 0).long().cumsum(1).argmax(1)
    torch.manual_seed(0)
    fast = model.encode_views(SEQ, tables=model.item_tables(), swap_last=last)
    torch.manual_seed(0)
    full = model.encode_views(SEQ)  # the same random swap positions (dropout is 0 in make_model)
    rows = torch.arange(len(SEQ))
    assert torch.allclose(fast.swap_views[:, :, 0], full.swap_views[:, rows, last], atol=1e-5)
    assert torch.allclose(fast.z, full.z, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"content_table": "frozen"}, {"score_refined": True},
                                       {"score_refined": True, "content_table": "frozen"}])
def test_score_table_from_the_shared_tables_is_the_score_table(overrides):
    model = make_model(**overrides).eval()
    with torch.no_grad():
        model.missing["text"].fill_(0.7)  # item 5 has no text: its frozen row is this vector
    shared, alone = model.score_table(model.item_tables()), model.score_table()
    assert torch.allclose(shared, alone, atol=1e-6)
    d = model.cfg.hidden_size
    if overrides.get("content_table") == "frozen":  # text scored on the fixed projection, refined or not
        assert torch.equal(shared[:, d:2 * d], model.frozen_table("text"))
        assert torch.equal(shared[5, d:2 * d], torch.full((d,), 0.7))
        assert set(model.item_tables()) == ({"id", "text", "image"} if overrides.get("score_refined") else {"id"})


@pytest.mark.parametrize("overrides", SWITCHES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_the_ce_learns_frozen_content_tables_at_their_absent_items_only_with_the_same_gradients(overrides,
                                                                                               monkeypatch):
    """The CE computes a frozen content table's gradient at the items without that content (items 5 and 7 here),
    which is all the missing vector learns from it: every gradient equals the whole-table CE's."""
    model = make_model(**overrides).train()
    rows = model.score_grad_rows()
    frozen = model.cfg.content_table == "frozen" and not model.cfg.score_refined and model.cfg.score_scale == "none"
    if frozen:
        assert [r.tolist() if r is not None else None for r in rows] == [None, [5], [7]]
    else:
        assert rows == [None] * len(model.mods)
    loss, grads = _loss(model, 0)
    monkeypatch.setattr(model, "score_grad_rows", lambda: [None] * len(model.mods))
    ref, ref_grads = _loss(model, 0)
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6), name
