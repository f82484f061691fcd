"""Model switches beyond the paper's ablations: multi-hot category loss, weight temperature, score
scales, one encoder per modality. Each off by default; each does what it says when on."""

import pytest
import torch
import torch.nn.functional as F

from cammsr.model import CAMMSR, ModelConfig

N, C, T, DT, DI, D = 12, 3, 5, 6, 4, 8
# item -> category path tokens (-1 padded): token 0 is the shared root, 1..4 sub-categories
PATHS = torch.tensor([[-1, -1]] + [[0, 1 + (i % 4)] for i in range(N)])


def make(**overrides) -> CAMMSR:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=N, num_categories=C, text_dim=DT, image_dim=DI, hidden_size=D, num_layers=1,
                      num_heads=2, ffn_size=16, dropout=0.0, max_seq_len=6, num_path_tokens=T, **overrides)
    cats = torch.cat([torch.tensor([-1]), torch.arange(N) % C])
    present = torch.ones(N + 1, dtype=torch.bool)
    present[0] = False
    return CAMMSR(cfg, cats, torch.randn(N + 1, DT), present, torch.randn(N + 1, DI), present, item_path=PATHS)


def test_bce_category_loss_is_the_multi_hot_path_loss_by_hand():
    model = make(category_loss="bce")
    items = torch.tensor([1, 2, 6])
    logits = torch.randn(3, len(items), T)
    target = torch.zeros(len(items), T)
    for row, item in enumerate(items.tolist()):
        target[row, [0, 1 + ((item - 1) % 4)]] = 1.0
    expected = sum(F.binary_cross_entropy_with_logits(logits[m], target, reduction="sum") for m in range(3))
    assert torch.allclose(model.category_loss(logits, items), expected / (3 * len(items)))


def test_bce_confidence_is_the_mean_log_sigmoid_of_the_true_path_tokens():
    model = make(category_loss="bce")
    items = torch.tensor([3, 4])
    logits = torch.randn(3, 2, T)
    logp = model.true_category_logp(logits, items)
    for m in range(3):
        for row, item in enumerate(items.tolist()):
            tokens = [0, 1 + ((item - 1) % 4)]
            assert torch.allclose(logp[m, row], F.logsigmoid(logits[m, row, tokens]).mean())


def test_bce_model_trains_a_step_and_its_head_has_one_output_per_token():
    model = make(category_loss="bce")
    assert model.cat_head.out_features == T
    seq = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    loss, parts = model(seq, torch.tensor([[2, 3, 4, 0], [5, 6, 7, 8]]))
    loss.backward()
    assert parts["cat"] > 0 and model.cat_head.weight.grad.abs().sum() > 0


def test_bce_needs_the_item_paths():
    cfg = ModelConfig(num_items=N, num_categories=C, hidden_size=D, num_heads=2, category_loss="bce",
                      num_path_tokens=T, use_text=False, use_image=False)
    with pytest.raises(ValueError, match="needs item_path"):
        CAMMSR(cfg, torch.zeros(N + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_path_tokens"):
        ModelConfig(num_items=N, num_categories=C, category_loss="bce")


def test_weight_temperature_below_one_sharpens_the_confidence_weights():
    items = torch.arange(1, N + 1)

    def entropy(model):
        _, w, _ = model.camoe(items)
        return float(-(w * w.log()).sum(-1).mean().detach())

    plain, sharp = make(), make(weight_temperature=0.1)
    sharp.load_state_dict(plain.state_dict())
    assert entropy(sharp) < entropy(plain)
    _, w, logits = plain.camoe(items)
    logp = plain.true_category_logp(logits, items)
    assert torch.allclose(w, logp.T.softmax(-1))  # T = 1 is the plain softmax of log p


def test_learned_score_scale_multiplies_each_modality_term():
    model = make(score_scale="learned")
    with torch.no_grad():
        model.log_score_scale.copy_(torch.tensor([0.0, 1.0, -1.0]))
    model.eval()
    seq, lengths = torch.tensor([[1, 2, 3]]), torch.tensor([3])
    z = model.encode_views(seq, last=lengths - 1).z[:, :, 0]  # [M, 1, d]
    expected = sum(torch.exp(torch.tensor(s)) * (z[j] @ model.item_table(m).T)
                   for j, (m, s) in enumerate(zip(model.mods, [0.0, 1.0, -1.0], strict=True)))
    scores = model.score_last(seq, lengths)
    assert torch.allclose(scores[:, 1:], expected[:, 1:], atol=1e-5)


def test_one_encoder_per_modality_has_its_own_weights_and_stays_causal():
    model = make(shared_encoder=False)
    assert set(model.encoders) == {"id", "text", "image"}
    assert model.encoders["id"][0].qkv.weight.data_ptr() != model.encoders["text"][0].qkv.weight.data_ptr()
    model.eval()
    a = model.encode_views(torch.tensor([[1, 2, 3, 4]])).z
    b = model.encode_views(torch.tensor([[1, 2, 9, 10]])).z
    assert torch.allclose(a[:, :, :2], b[:, :, :2], atol=1e-6)  # later items never reach earlier outputs
    model.train()
    loss, parts = model(torch.tensor([[1, 2, 3, 0]]), torch.tensor([[2, 3, 4, 0]]))
    loss.backward()
    assert "cl" in parts and model.encoders["image"][0].qkv.weight.grad.abs().sum() > 0


def test_sasrec_ignores_the_new_switches():
    cfg = ModelConfig(num_items=N, num_categories=C, score_scale="learned", shared_encoder=False).sasrec()
    assert (cfg.score_scale, cfg.shared_encoder) == ("none", True)


def test_refined_score_tables_are_the_camoe_outputs():
    model = make(score_refined=True)
    model.eval()
    refined, _, _ = model.camoe(torch.arange(N + 1))
    table = model.score_table()
    assert torch.allclose(table, torch.cat([refined[m] for m in model.mods], dim=-1))
    plain = make()
    assert not torch.allclose(plain.score_table(), table)


def test_pca_init_keeps_the_features_similarity_in_the_item_tables():
    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(DT, 3))[0]  # text features that live in 3 dimensions
    feats = torch.nn.functional.normalize(torch.randn(N + 1, 3) @ basis.T, dim=-1)
    cfg = ModelConfig(num_items=N, num_categories=C, text_dim=DT, hidden_size=D, num_heads=2, use_image=False,
                      feature_init="pca")
    present = torch.ones(N + 1, dtype=torch.bool)
    present[0] = False
    torch.manual_seed(0)
    model = CAMMSR(cfg, torch.cat([torch.tensor([-1]), torch.arange(N) % C]), feats, present)
    w = model.feature_proj["text"].weight  # [D, DT]
    assert torch.allclose(w[:3] @ w[:3].T, torch.eye(3), atol=1e-5)
    e = model.item_table("text")[1:]  # [N, D]
    # the top directions span the features' subspace, so the projection keeps their dot products
    assert torch.allclose(e[:, :3] @ e[:, :3].T, feats[1:] @ feats[1:].T, atol=1e-4)
    torch.manual_seed(0)
    normal = CAMMSR(cfg.__class__(**{**cfg.to_dict(), "feature_init": "normal"}),
                    torch.cat([torch.tensor([-1]), torch.arange(N) % C]), feats, present)
    assert torch.equal(normal.id_emb.weight, model.id_emb.weight)  # no extra random draw


def test_frozen_content_table_scores_items_by_their_fixed_feature_projection():
    model = make(content_table="frozen")
    basis = model.frozen["text"].score_basis  # [d, D_T]; D_T = 6 < d = 8: two rows stay zero
    assert torch.allclose(basis[:DT] @ basis[:DT].T, torch.eye(DT), atol=1e-5)  # orthonormal principal directions
    assert not basis[DT:].any()
    table = model.score_table()  # [N+1, M*d]: id | text | image
    feats = model.frozen["text"].features
    assert torch.allclose(table[1:, D:2 * D], feats[1:] @ basis.T, atol=1e-6)
    seq, tgt = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[2, 3, 4, 0]])
    loss, _ = model(seq, tgt)
    loss.backward()
    assert basis.grad is None and not basis.requires_grad  # not trained
    assert "frozen.text.score_basis" in model.state_dict()  # saved: the trained queries depend on it
    # the projection is computed once and kept, but a basis loaded in place (a checkpoint) is seen
    assert model.frozen["text"].projected(basis) is model.frozen["text"].projected(basis)
    with torch.no_grad():
        basis.mul_(2.0)
    assert torch.allclose(model.score_table()[1:, D:2 * D], 2 * (feats[1:] @ (basis / 2).T), atol=1e-6)
