import pytest
import torch

from cammsr.model import CAMMSR, ModelConfig, ModelOutput
from cammsr.model.dyt import DyT, make_norm

N, C, DT, DI = 30, 3, 12, 10


def make_model(**overrides) -> CAMMSR:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=N, num_categories=C, text_dim=DT, image_dim=DI, hidden_size=16, num_layers=2,
                      num_heads=2, ffn_size=32, dropout=0.0, max_seq_len=8, **overrides)
    cats = torch.cat([torch.tensor([-1]), torch.arange(N) % C])
    text_present = torch.ones(N + 1, dtype=torch.bool)
    text_present[[0, 5]] = False  # item 5 has no text
    image_present = torch.ones(N + 1, dtype=torch.bool)
    image_present[[0, 7]] = False
    return CAMMSR(cfg, cats, torch.randn(N + 1, DT), text_present, torch.randn(N + 1, DI), image_present)


def test_dyt_is_gamma_tanh_alpha_x_plus_beta_and_learns_alpha():
    dyt = DyT(4, alpha_init=0.5)
    with torch.no_grad():
        dyt.gamma.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        dyt.beta.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x = torch.randn(3, 4)
    assert torch.allclose(dyt(x), dyt.gamma * torch.tanh(0.5 * x) + dyt.beta)
    dyt(x).sum().backward()
    assert dyt.alpha.grad is not None and dyt.alpha.grad.abs() > 0
    ln = make_norm("layernorm", 4)
    assert ln(x).shape == dyt(x).shape == x.shape


def test_missing_modality_uses_the_learned_vector():
    model = make_model()
    with torch.no_grad():
        model.missing["text"].fill_(3.0)
    e = model.item_table("text", torch.tensor([4, 5]))
    assert torch.equal(e[1], torch.full((16,), 3.0))
    assert not torch.equal(e[0], e[1])


def test_modality_weights_sum_to_one():
    model = make_model()
    _, w, logits = model.camoe(torch.arange(1, N + 1))
    assert w.shape == (N, 3) and logits.shape == (3, N, C)
    assert torch.allclose(w.sum(-1), torch.ones(N), atol=1e-6)
    learned = make_model(weight_mode="learned")
    _, w2, _ = learned.camoe(torch.arange(1, N + 1))
    assert torch.allclose(w2.sum(-1), torch.ones(N), atol=1e-6)


@pytest.mark.parametrize("mode", ["confidence", "learned"])
def test_category_loss_reaches_and_moves_the_modality_weights(mode):
    model = make_model(weight_mode=mode)
    items = torch.arange(1, N + 1)
    _, w0, logits = model.camoe(items)
    cat = model.item_category[items]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), cat.repeat(3))
    loss.backward()
    assert model.cat_head.weight.grad.abs().sum() > 0
    assert all(model.cat_proj[m].weight.grad.abs().sum() > 0 for m in model.mods)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # the trainer uses AdamW
    for _ in range(20):  # train on the category loss alone
        opt.zero_grad()
        _, _, logits = model.camoe(items)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), cat.repeat(3)).backward()
        opt.step()
    _, w1, _ = model.camoe(items)
    assert (w1 - w0).abs().max() > 1e-3


def test_causal_no_future_leakage():
    model = make_model().eval()
    seq = torch.tensor([[3, 9, 4, 11, 2, 0]])
    later = seq.clone()
    later[0, 3:5] = torch.tensor([20, 21])
    z1, z2 = model(seq).z, model(later).z
    assert torch.allclose(z1[:, :, :3], z2[:, :, :3], atol=1e-6)
    assert not torch.allclose(z1[:, :, 3], z2[:, :, 3])


def test_eval_scores_are_finite_with_padding():
    model = make_model().eval()
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]])
    s = model.score_last(seq, torch.tensor([3, 1]))
    assert s.shape == (2, N + 1)
    assert torch.isfinite(s[:, 1:]).all() and torch.isinf(s[:, 0]).all()


@pytest.mark.parametrize("overrides", [{}, {"dyt_scope": "all"}, {"norm": "layernorm", "use_text": False,
                                                                     "use_image": False, "num_experts": 0}])
def test_score_last_computes_only_the_last_position_yet_equals_the_full_pass(overrides):
    model = make_model(**overrides).eval()
    seq = torch.tensor([[1, 2, 3, 4, 5, 6], [4, 9, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0], [8, 3, 2, 1, 0, 0]])
    lengths = torch.tensor([6, 2, 1, 4])
    with torch.no_grad():
        z = model.encode_views(seq).z  # [M, B, L, d]: every position
        full = model.scores(z[:, torch.arange(4), lengths - 1])
    assert torch.allclose(model.score_last(seq, lengths), full, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"weight_mode": "learned"}, {"num_experts": 0},
                                       {"use_text": False, "use_image": False}])
def test_refined_tables_give_the_user_vectors_of_the_per_batch_camoe(overrides):
    model = make_model(**overrides).eval()
    seq = torch.tensor([[1, 2, 3, 5, 7, 6], [4, 9, 0, 0, 0, 0], [30, 0, 0, 0, 0, 0], [8, 3, 2, 1, 0, 0]])
    lengths = torch.tensor([6, 2, 1, 4])
    tables = model.item_tables()
    refined = model.refined_tables(tables, chunk=7)  # chunks: 31 items in 5 pieces
    assert all(t.shape == (N + 1, 16) for t in refined.values())
    per_batch = model.user_vectors(seq, lengths, tables)
    assert torch.allclose(model.user_vectors(seq, lengths, tables, refined), per_batch, atol=1e-6)
    with pytest.raises(ValueError, match="0..30"):
        model.user_vectors(torch.tensor([[31, 0]]), torch.tensor([1]), tables, refined)
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().refined_tables()


def test_loss_parts_and_backward():
    model = make_model(swap_prob=0.5).train()
    seq = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    tgt = torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0]])
    loss, parts = model.loss(seq, tgt)
    assert set(parts) == {"rec", "cat", "cl"}
    loss.backward()
    assert model.experts[0].weight.grad is not None


@pytest.mark.parametrize("overrides, mods", [
    ({}, ("id", "text", "image")),
    ({"use_id": False}, ("text", "image")),
    ({"use_text": False, "use_image": False}, ("id",)),
    ({"category_guidance": False, "swap_cl": False, "norm": "layernorm"}, ("id", "text", "image")),
    ({"dyt_scope": "all"}, ("id", "text", "image")),
])
def test_variants_train_a_step(overrides, mods):
    model = make_model(**overrides).train()
    assert model.mods == mods
    seq = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    loss, _ = model.loss(seq, torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0]]))
    loss.backward()
    assert torch.isfinite(loss)


def test_sasrec_is_the_same_model_with_switches():
    cfg = make_model().cfg.sasrec()
    model = CAMMSR(cfg, torch.zeros(N + 1, dtype=torch.long))
    assert model.mods == ("id",) and not model.use_moe
    assert isinstance(model.input_norm["id"], torch.nn.LayerNorm)


def test_init_and_loss_are_pinned():
    """Random init follows module registration order: reordering the model file changes these numbers."""
    model = make_model().train()
    sums = {"id_emb": model.id_emb.weight, "text_proj": model.feature_proj["text"].weight,
            "image_proj": model.feature_proj["image"].weight, "pos_emb": model.pos_emb.weight,
            "experts.3": model.experts[3].weight, "cat_head": model.cat_head.weight,
            "blocks.1.ff.2": model.blocks[1].ff[2].weight}
    assert {k: float(v.detach().double().sum()) for k, v in sums.items()} == pytest.approx(
        {"id_emb": -0.73010056, "text_proj": -0.03368245, "image_proj": 0.11353578, "pos_emb": -0.14032472,
         "experts.3": -0.58601203, "cat_head": 0.01952072, "blocks.1.ff.2": -0.42345153}, abs=1e-7)
    seq = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    torch.manual_seed(1)  # the swap positions
    loss, parts = model.loss(seq, torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0]]))
    assert loss.item() == pytest.approx(4.023495197296143, rel=1e-5)
    assert parts == pytest.approx({"rec": 3.887373924255371, "cat": 1.098564624786377, "cl": 0.2626476287841797},
                                  rel=1e-5)
    s = model.eval().score_last(seq, torch.tensor([4, 2]))[:, 1:4]
    expected = torch.tensor([[0.67575073, 0.62430257, 0.00154251], [-0.27021769, -1.12508202, 0.34632087]])
    assert torch.allclose(s, expected, atol=1e-5)


def test_forward_returns_a_typed_output():
    model = make_model().train()
    out = model(torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]))
    assert isinstance(out, ModelOutput)
    U = len(out.unique_items)
    assert out.z.shape == (3, 2, 4, 16) and out.swap_views.shape == (2, 2, 4, 16)
    assert out.cat_logits.shape == (3, U, C) and out.weights.shape == (U, 3)
    assert model.eval()(torch.tensor([[1, 2]])).swap_views is None  # swap views only in training


def _features(rows: int = N + 1, dim: int = DT) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, dim), torch.ones(rows, dtype=torch.bool)


def _cfg(**overrides) -> ModelConfig:
    kw = dict(num_items=N, num_categories=C, text_dim=DT, image_dim=0, hidden_size=16, num_layers=1, num_heads=2,
              ffn_size=32, max_seq_len=8)
    return ModelConfig(**{**kw, **overrides})


CATS = torch.zeros(N + 1, dtype=torch.long)


@pytest.mark.parametrize("args, error, match", [
    ((CATS,), ValueError, "text is active .* was not given"),
    ((CATS, *_features(rows=N)), ValueError, rf"text_features: expected {N + 1} rows"),
    ((CATS, *_features(dim=DT + 1)), ValueError, rf"text_features: expected shape \({N + 1}, {DT}\)"),
    ((CATS, torch.randn(N + 1, DT), torch.ones(N, dtype=torch.bool)), ValueError, "text_present: expected"),
    ((CATS, torch.randn(N + 1, DT), torch.ones(N + 1, 2, dtype=torch.bool)), ValueError, "text_present: expected"),
    ((CATS, torch.randn(N + 1, DT).numpy(), torch.ones(N + 1, dtype=torch.bool)), TypeError, "text_features"),
    ((CATS[:-1], *_features()), ValueError, rf"item_category: expected {N + 1} rows"),
])
def test_construction_errors_name_what_was_expected(args, error, match):
    with pytest.raises(error, match=match):
        CAMMSR(_cfg(), *args)


@pytest.mark.parametrize("overrides, match", [
    ({"norm": "rmsnorm"}, "ModelConfig.norm: expected one of"),
    ({"weight_mode": "mean"}, "ModelConfig.weight_mode: expected one of"),
    ({"dyt_scope": "blocks"}, "ModelConfig.dyt_scope: expected one of"),
    ({"feature_norm": "l2"}, "ModelConfig.feature_norm: expected one of"),
    ({"num_heads": 3}, "not divisible by num_heads 3"),
    ({"use_id": False, "use_text": False}, "no modality is active"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        CAMMSR(_cfg(**overrides), CATS, *_features())


SEQ = torch.tensor([[1, 2, 3], [4, 0, 0]])


@pytest.mark.parametrize("seq, error, match", [
    (SEQ.tolist(), TypeError, "seq: expected a LongTensor"),
    (SEQ.int(), TypeError, r"seq: expected a LongTensor \[B, L\] of item indices, found torch.int32"),
    (SEQ[0], ValueError, r"seq: expected 2 dimensions \[B, L\], found shape \(3,\)"),
    (torch.ones(2, 9, dtype=torch.long), ValueError, "9 positions, longer than max_seq_len 8"),
    (torch.tensor([[1, N + 1]]), ValueError, rf"item indices must be in 0..{N}, found 1..{N + 1}"),
    (torch.tensor([[-1, 2]]), ValueError, rf"item indices must be in 0..{N}, found -1..2"),
])
def test_batch_errors(seq, error, match):
    model = make_model()
    with pytest.raises(error, match=match):
        model.encode_views(seq)
    with pytest.raises(error, match=match):
        model.loss(seq, seq)


@pytest.mark.parametrize("targets, error, match", [
    (SEQ[:, :2], ValueError, r"targets: expected the shape of seq \(2, 3\), found \(2, 2\)"),
    (SEQ.float(), TypeError, "targets: expected a LongTensor"),
])
def test_target_errors(targets, error, match):
    with pytest.raises(error, match=match):
        make_model().loss(SEQ, targets)


@pytest.mark.parametrize("lengths, error, match", [
    (torch.tensor([3]), ValueError, r"lengths: expected shape \(2,\)"),
    (torch.tensor([3, 0]), ValueError, r"lengths: expected values in 1..3"),
    (torch.tensor([4, 1]), ValueError, r"lengths: expected values in 1..3"),
    (torch.tensor([3.0, 1.0]), TypeError, r"lengths: expected a LongTensor \[B\], found torch.float32"),
])
def test_score_last_length_errors(lengths, error, match):
    with pytest.raises(error, match=match):
        make_model().eval().score_last(SEQ, lengths)
