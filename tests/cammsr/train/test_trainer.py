import json

import torch

from cammsr.core.config import EvaluateParams, ProjectParams, SplitParams, TrainParams
from cammsr.data.splits import run_split
from cammsr.evaluate.stage import run_evaluate
from cammsr.train.trainer import run_train

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
