import json

import torch

from cammsr.core.config import EvaluateParams, ProjectParams, SplitParams, TrainParams
from cammsr.data.splits import run_split
from cammsr.evaluate.stage import run_evaluate
from cammsr.train.trainer import run_train
from tests.cammsr.conftest import write_random_features

FAST = dict(hidden_size=16, num_layers=1, num_heads=1, ffn_size=32, dropout=0.1, lr=5e-3, batch_size=32,
            patience=50)


def test_sasrec_learns_the_planted_signal_above_popularity(tiny_catalog):
    run_split("tiny", SplitParams(), tiny_catalog)
    project = ProjectParams(seed=0, device="cpu")
    run_train("tiny", TrainParams(model="sasrec", epochs=15, **FAST), SplitParams(), EvaluateParams(), project,
              tiny_catalog)
    s = run_evaluate("tiny", SplitParams(), EvaluateParams(), project, tiny_catalog)
    metrics = json.loads(tiny_catalog.metrics.read_text())
    assert metrics["model"]["test"]["hr@10"] > 0.5  # the next item is always prev + 1
    assert metrics["model"]["test"]["ndcg@10"] > metrics["popularity"]["test"]["ndcg@10"] + 0.2
    assert s.counts["users"] == 120


def test_resume_reproduces_an_uninterrupted_run(tiny_catalog, tmp_path):
    import shutil

    run_split("tiny", SplitParams(), tiny_catalog)
    other = type(tiny_catalog)(tmp_path / "copy")
    shutil.copytree(tiny_catalog.root, other.root)
    project = ProjectParams(seed=3, device="cpu")
    params = TrainParams(model="cammsr", epochs=4, **FAST)
    run_train("tiny", params, SplitParams(), EvaluateParams(), project, tiny_catalog)
    run_train("tiny", params.model_copy(update={"epochs": 2}), SplitParams(), EvaluateParams(), project, other)
    run_train("tiny", params, SplitParams(), EvaluateParams(), project, other, resume=True)
    a = torch.load(tiny_catalog.models_dir / "last.pt", weights_only=True)
    b = torch.load(other.models_dir / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float()), k


def test_id_smoothing_is_picked_on_validation_and_written_into_the_checkpoint(tiny_catalog, monkeypatch):
    import cammsr.train.trainer as trainer

    run_split("tiny", SplitParams(), tiny_catalog)
    write_random_features(tiny_catalog)
    project = ProjectParams(seed=0, device="cpu")
    params = TrainParams(model="cammsr", epochs=2, id_smoothing=[1.0, 4.0], **FAST)
    s = run_train("tiny", params, SplitParams(), EvaluateParams(), project, tiny_catalog)
    assert s.counts["id_smoothing"] in (0.0, 1.0, 4.0)
    assert s.counts["smoothed_valid_ndcg@10"] >= s.counts["best_valid_ndcg@10"]  # 0 (off) is among the choices
    off = run_train("tiny", params.model_copy(update={"id_smoothing": []}), SplitParams(), EvaluateParams(), project,
                    tiny_catalog)
    assert "id_smoothing" not in off.counts
    trained = torch.load(tiny_catalog.checkpoint, weights_only=True)

    # the choice and the rewrite, with validation scores scripted by lambda (4 wins)
    real_validate = trainer.validate
    scores = iter([0.30, 0.55])  # lambda 1, 4 (0 is the checkpoint's own valid)

    def scripted(model, *args, **kwargs):
        return {**real_validate(model, *args, **kwargs), "ndcg@10": next(scores)}

    monkeypatch.setattr(trainer, "validate", scripted)
    from cammsr.data.splits import load_splits
    from cammsr.model.io import build_model

    split = load_splits(tiny_catalog.splits_dir)
    model = build_model(params, SplitParams(), split, tiny_catalog, 0)
    lam, valid = trainer.fit_id_smoothing(model, tiny_catalog.checkpoint, split, 50, EvaluateParams(),
                                          torch.device("cpu"), [4.0, 1.0])
    assert (lam, valid) == (4.0, 0.55)
    ckpt = torch.load(tiny_catalog.checkpoint, weights_only=True)
    assert ckpt["id_smoothing"] == 4.0 and ckpt["valid"]["ndcg@10"] == 0.55
    assert ckpt["valid_unsmoothed"] == trained["valid"] and ckpt["epoch"] == trained["epoch"]
    assert not torch.equal(ckpt["state_dict"]["id_emb.weight"], trained["state_dict"]["id_emb.weight"])
    others = [k for k in trained["state_dict"] if k != "id_emb.weight"]
    assert all(torch.equal(ckpt["state_dict"][k], trained["state_dict"][k]) for k in others)
    # a resumed run that had finished does not smooth its checkpoint twice
    assert trainer.fit_id_smoothing(model, tiny_catalog.checkpoint, split, 50, EvaluateParams(),
                                    torch.device("cpu"), [4.0, 1.0]) == (4.0, 0.55)
    again = torch.load(tiny_catalog.checkpoint, weights_only=True)
    assert torch.equal(again["state_dict"]["id_emb.weight"], ckpt["state_dict"]["id_emb.weight"])
