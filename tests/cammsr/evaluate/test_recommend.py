"""The recommend stage: top-k of a tiny trained model, against its scores computed directly."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cammsr.core.config import RecommendParams, SplitParams, TrainParams
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import load_splits, run_split
from cammsr.evaluate import ranking
from cammsr.evaluate.recommend import read_user_list, run_recommend
from cammsr.model.io import build_model, item_ids_sha256, load_checkpoint, save_checkpoint
from features.store import FeatureRows, read_rows, write_rows

TRAIN = dict(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, dropout=0.0)
DIMS = {"text": 12, "image": 10}


def _store_rows(ids, dim, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((len(ids), dim)) * 3 + 5).astype(np.float32)


def _write_store(paths, modality, ids, vectors):
    write_rows(paths.feature_store(modality), FeatureRows(list(ids), ["x"] * len(ids), vectors, {"m": modality}))


def _train(model, split, steps=5):
    seqs = [s for s in split.train_sequences() if len(s) > 4][:32]
    seq = torch.tensor(np.stack([s[:4] for s in seqs]))
    tgt = torch.tensor(np.stack([s[1:5] for s in seqs]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss, _ = model(seq, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture
def trained(tiny_catalog):
    """The tiny catalog split, text and image stores, and a checkpoint of a few training steps."""
    run_split("tiny", SplitParams(), tiny_catalog)
    split = load_splits(tiny_catalog.splits_dir)
    for seed, (modality, dim) in enumerate(DIMS.items()):
        _write_store(tiny_catalog, modality, split.item_ids, _store_rows(split.item_ids, dim, seed))
    run_split_features("tiny", tiny_catalog)
    torch.manual_seed(0)
    model = _train(build_model(TrainParams(id_dropout=0.2, **TRAIN), SplitParams(), split, tiny_catalog, 0), split)
    save_checkpoint(tiny_catalog.checkpoint, model, epoch=4, model_name="cammsr",
                    item_ids_sha256=item_ids_sha256(split.item_ids))
    return tiny_catalog


def _direct_top(model, split, user_rows, k, exclude_seen, num_items):
    """Top-k (item index, score) per user by a full argsort of the model's scores: best first, ties by index."""
    out = {}
    L = model.cfg.max_seq_len
    for u in user_rows:
        s = split.sequences[u]
        seq = torch.tensor(s[-L:])[None]
        scores = model.score_last(seq, torch.tensor([len(seq[0])]))[0].numpy().copy()  # [N+1]
        scores[0] = -np.inf
        if exclude_seen:
            scores[s] = -np.inf
        order = np.lexsort((np.arange(num_items + 1), -scores))[:k]
        out[split.user_ids[u]] = [(int(i), float(scores[i])) for i in order if np.isfinite(scores[i])]
    return out


def _by_user(table: pl.DataFrame) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for row in table.sort(["user_id", "rank"]).iter_rows(named=True):
        out.setdefault(row["user_id"], []).append((row["item_id"], row["score"]))
    return out


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommendations_equal_a_direct_argsort_of_the_model_scores(trained, exclude_seen, monkeypatch):
    monkeypatch.setattr(ranking, "RANK_SPAN", 32)  # several spans of user vectors, each of two batches
    params = RecommendParams(k=7, exclude_seen=exclude_seen, batch_size=16)  # several batches
    summary = run_recommend("tiny", params, trained, device="cpu")
    split = load_splits(trained.splits_dir)
    model, _ = load_checkpoint(trained.checkpoint, split, trained)
    expected = _direct_top(model.eval(), split, range(len(split.user_ids)), 7, exclude_seen, split.num_items)
    table = pl.read_parquet(trained.recommendations)
    got = _by_user(table)
    assert set(got) == set(split.user_ids) and summary.counts["users"] == len(split.user_ids)
    for user, items in expected.items():
        assert [i for i, _ in got[user]] == [split.item_ids[i - 1] for i, _ in items], user
        np.testing.assert_allclose([s for _, s in got[user]], [s for _, s in items], rtol=1e-5, atol=1e-6)
    assert table.group_by("user_id").agg(pl.col("rank").sort()).get_column("rank").to_list()[0] == list(range(1, 8))
    if exclude_seen:
        seen = {u: {split.item_ids[i - 1] for i in s} for u, s in zip(split.user_ids, split.sequences, strict=True)}
        assert not any(row["item_id"] in seen[row["user_id"]] for row in table.iter_rows(named=True))
    else:  # the tiny catalog's users walk i -> i+1: a model that learned it ranks the next items, not unseen ones
        assert summary.counts["rows"] == 7 * len(split.user_ids)


def test_schema_metadata_and_streamed_row_groups(trained):
    run_recommend("tiny", RecommendParams(k=5, batch_size=32), trained, device="cpu")
    f = pq.ParquetFile(trained.recommendations)
    assert [(fld.name, fld.type, fld.nullable) for fld in f.schema_arrow] == [
        ("user_id", pa.string(), False), ("rank", pa.int16(), False), ("item_id", pa.string(), False),
        ("score", pa.float32(), False)]
    meta = {k.decode(): v.decode() for k, v in f.schema_arrow.metadata.items()}
    assert meta["checkpoint_sha256"] == hashlib.sha256(trained.checkpoint.read_bytes()).hexdigest()
    assert meta["model"] == "cammsr" and '"hidden_size": 16' in meta["model_config"]
    assert f.metadata.num_row_groups == -(-len(load_splits(trained.splits_dir).user_ids) // 32)  # one per batch


def test_unknown_users_are_counted_and_listed_not_an_error(trained, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("u0003\n# a comment\nnobody\nu0001\n\nu0003\nghost-42\n")
    assert read_user_list(users) == ["u0003", "nobody", "u0001", "ghost-42"]
    out = tmp_path / "some.parquet"
    summary = run_recommend("tiny", RecommendParams(k=3), trained, device="cpu", users=users, out=out)
    assert summary.counts["users"] == 2 and summary.counts["unknown_users"] == 2
    assert any("nobody, ghost-42" in note for note in summary.notes)
    assert sorted(pl.read_parquet(out)["user_id"].unique().to_list()) == ["u0001", "u0003"]
    assert not trained.recommendations.exists()  # --out elsewhere leaves the stage's output alone
    csv = tmp_path / "users.csv"
    csv.write_text("user_id,segment\nu0002,a\n")
    assert read_user_list(csv) == ["u0002"]


def _add_item(paths, item_id: str, category: str, features: dict[str, np.ndarray]) -> None:
    """A new item in the catalog's metadata and in the given feature stores (no interactions)."""
    items = pl.read_parquet(paths.items)
    pl.concat([items, pl.DataFrame({"item_id": [item_id], "category": [category]})]).write_parquet(paths.items)
    for modality, vector in features.items():
        rows = read_rows(paths.feature_store(modality))
        _write_store(paths, modality, rows.item_ids + [item_id], np.vstack([rows.embeddings, vector[None]]))


def _user_z(model, split, u):
    """Z_m at user ``u``'s last position: [M, d]."""
    seq = torch.tensor(split.sequences[u][-model.cfg.max_seq_len:])[None]
    return model.encode_views(seq, last=torch.tensor([seq.shape[1] - 1])).z[:, 0, 0]


def test_a_new_item_is_ranked_from_its_content_without_retraining(trained):
    split = load_splits(trained.splits_dir)
    n, u = split.num_items, 3
    model, _ = load_checkpoint(trained.checkpoint, split, trained)
    model.eval()
    train_mean = {m: read_rows(trained.split_features(m)).embeddings.mean(0) for m in DIMS}
    # Content the scored table favours for user u: after centring on the training items' mean and scaling to
    # unit length, the feature is the direction W_m^T Z_m of the best response, W_m the frozen principal
    # directions that score text/image (content_table "frozen", the default) or the learned projection.
    with torch.no_grad():
        z = _user_z(model, split, u)
        frozen = model.cfg.content_table == "frozen"
        w = {m: model.frozen[m].score_basis if frozen else model.feature_proj[m].weight for m in DIMS}
        best = {m: (w[m].T @ z[model.mods.index(m)]).numpy() for m in DIMS}
    features = {m: train_mean[m] + 3 * best[m] / np.linalg.norm(best[m]) for m in DIMS}
    _add_item(trained, "new-item", "c1", features)
    _add_item(trained, "no-content", "c2", {})  # neither interactions nor features: never recommended
    summary = run_recommend("tiny", RecommendParams(k=n + 1, exclude_seen=False, new_item_neighbours=0), trained,
                            device="cpu")
    assert summary.counts["new_items"] == 1 and summary.counts["items"] == n + 1
    assert any("1 catalog items outside the trained index have no content" in note for note in summary.notes)
    table = pl.read_parquet(trained.recommendations)
    assert "no-content" not in table["item_id"].to_list()
    new = table.filter(pl.col("item_id") == "new-item")
    assert new.height == len(split.user_ids) and np.isfinite(new["score"].to_numpy()).all()
    mine = table.filter(pl.col("user_id") == split.user_ids[u]).sort("rank")
    assert mine.filter(pl.col("item_id") == "new-item")["rank"][0] <= 5, mine.head(8)

    # Its score by hand, from the model as trained (no growth): the unknown-ID vector and the content on the
    # scored table's projection (frozen directions or the trained projection), prepared with the training
    # items' mean.
    with torch.no_grad():
        e = {"id": model.missing["id"]}
        for m in DIMS:
            f = torch.from_numpy(features[m] - train_mean[m]).float()
            f = f / f.norm()
            e[m] = model.frozen[m].score_basis @ f if frozen else model.feature_proj[m](f)
        by_hand = sum(float(z[j] @ e[m]) for j, m in enumerate(model.mods))
    assert mine.filter(pl.col("item_id") == "new-item")["score"][0] == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    # the trained items keep their order: the catalog's growth moved none of their features
    old = _direct_top(model, split, [u], n, False, n)[split.user_ids[u]]
    assert mine.filter(pl.col("item_id") != "new-item")["item_id"].to_list() == [split.item_ids[i - 1] for i, _ in old]

    # With an ID row from its nearest trained item in content (mean cosine of the prepared features over the
    # modalities): the ID term is that item's row instead of the unknown vector, the content terms are the same.
    with torch.no_grad():
        prepared = {m: torch.nn.functional.normalize(torch.from_numpy(features[m] - train_mean[m]).float(), dim=0)
                    for m in DIMS}
        cos = sum(torch.nn.functional.normalize(model.frozen[m].features[1:], dim=1) @ prepared[m]
                  for m in DIMS) / len(DIMS)  # [n]
        nearest = 1 + int(cos.argmax())
        neighbour_score = by_hand + float(z[model.mods.index("id")] @ (model.id_emb.weight[nearest] - e["id"]))
    run_recommend("tiny", RecommendParams(k=n + 1, exclude_seen=False, new_item_neighbours=1), trained, device="cpu")
    table = pl.read_parquet(trained.recommendations).filter(pl.col("user_id") == split.user_ids[u])
    score = table.filter(pl.col("item_id") == "new-item")["score"][0]
    assert score == pytest.approx(neighbour_score, rel=1e-4, abs=1e-5) and score != pytest.approx(by_hand, rel=1e-3)

    off = run_recommend("tiny", RecommendParams(k=n + 1, include_new_items=False), trained, device="cpu")
    assert off.counts["new_items"] == 0 and "new-item" not in pl.read_parquet(trained.recommendations)["item_id"]


def test_an_id_only_checkpoint_ranks_no_new_item(trained):
    split = load_splits(trained.splits_dir)
    sasrec = build_model(TrainParams(model="sasrec", **TRAIN), SplitParams(), split, trained, 0)
    save_checkpoint(trained.checkpoint, sasrec, model_name="sasrec", item_ids_sha256=item_ids_sha256(split.item_ids))
    _add_item(trained, "new-item", "c1", {"text": np.ones(DIMS["text"], np.float32)})
    summary = run_recommend("tiny", RecommendParams(k=3), trained, device="cpu")
    assert summary.counts["new_items"] == 0
    assert any("ID-only checkpoint" in note for note in summary.notes)


def test_a_checkpoint_of_another_item_index_is_refused(trained):
    ckpt = torch.load(trained.checkpoint, weights_only=True)
    ckpt["item_ids_sha256"] = "0" * 64
    torch.save(ckpt, trained.checkpoint)
    with pytest.raises(ValueError, match="another item index"):
        run_recommend("tiny", RecommendParams(), trained, device="cpu")


def test_the_cli_passes_k_users_and_out_to_the_stage(trained, tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from cammsr import cli

    root = trained.root.parent.parent  # <tmp>/data/tiny -> <tmp>
    (root / "params.yaml").write_text(yaml.safe_dump({"catalogs": {"tiny": {"reviews": "file:unused"}},
                                                      "project": {"device": "cpu"}}))
    (root / "users.txt").write_text("u0005\nstranger\n")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(cli.app, ["recommend", "--catalog", "tiny", "--k", "4", "--users", "users.txt",
                                          "--out", "mine.parquet"])
    assert result.exit_code == 0, result.output
    assert "recommend[tiny] users=1 unknown_users=1 k=4 rows=4" in result.output
    table = pl.read_parquet(root / "mine.parquet")
    assert table["user_id"].to_list() == ["u0005"] * 4 and table["rank"].to_list() == [1, 2, 3, 4]
    missing = CliRunner().invoke(cli.app, ["recommend", "--catalog", "nope"])
    assert missing.exit_code == 2 and "nope" in missing.output
