import json

import numpy as np
import pytest

from cammsr.core.config import Params, SplitParams
from cammsr.data.splits import run_split
from cammsr.train import experiments
from cammsr.train.experiments import (
    METRICS,
    RunResult,
    ablation_lines,
    comparison_table,
    feature_source,
    run_experiments,
    verdict,
)
from features.store import FeatureRows, write_rows


def _result(variant, seed, ndcg):
    return RunResult(variant, seed, {m: (ndcg if m == "ndcg@10" else 0.5) for m in METRICS}, 2.0, 10)


def test_table_mean_std_and_relative_difference():
    table = comparison_table([_result("CAMMSR", 0, 0.30), _result("CAMMSR", 1, 0.40),
                              _result("SASRec", 0, 0.20), _result("SASRec", 1, 0.22)])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "0.3500 ± 0.0707" in rows["CAMMSR"] and "reference" in rows["CAMMSR"]
    assert "0.2100 ± 0.0141" in rows["SASRec"] and "-40.0%" in rows["SASRec"]


def test_verdict_compares_the_difference_with_the_sum_of_stds():
    # CAMMSR 0.35 ± 0.0707, SASRec 0.21 ± 0.0141: +0.14 = +66.7%, beyond 0.0849; B 0.30 ± 0.1414: within 0.2121
    results = [_result("CAMMSR", 0, 0.30), _result("CAMMSR", 1, 0.40), _result("SASRec", 0, 0.20),
               _result("SASRec", 1, 0.22), _result("B", 0, 0.20), _result("B", 1, 0.40)]
    lines = verdict(results, baselines=("SASRec", "B", "absent"))
    assert lines == [
        "- CAMMSR vs SASRec: test NDCG@10 0.3500 vs 0.2100, +66.7% (+0.1400, beyond the sum of their stds 0.0849).",
        "- CAMMSR vs B: test NDCG@10 0.3500 vs 0.3000, +16.7% (+0.0500, within the sum of their stds 0.2121).",
    ]


def test_ablation_lines_say_whether_a_removal_moves_the_paper_s_way():
    # CAMMSR 0.35 ± 0.0707; w/o swap-CL 0.20 ± 0 (beyond 0.0707); DyT removed 0.33 ± 0 (within); ID-only 0.36 (up)
    results = [_result("CAMMSR", 0, 0.30), _result("CAMMSR", 1, 0.40), _result("w/o swap-CL", 0, 0.20),
               _result("w/o swap-CL", 1, 0.20), _result("LayerNorm instead of DyT", 0, 0.33),
               _result("LayerNorm instead of DyT", 1, 0.33), _result("ID-only", 0, 0.36), _result("SASRec", 0, 0.1)]
    lines = ablation_lines(results)
    assert lines == [
        "- w/o swap-CL: 0.2000 vs 0.3500 (-42.9%): removing the modality-swap contrastive loss lowers NDCG@10, "
        "beyond noise: the paper's direction.",
        "- LayerNorm instead of DyT: 0.3300 vs 0.3500 (-5.7%): removing DynamicTanh (LayerNorm in its place) lowers "
        "NDCG@10 within noise (the sum of the standard deviations is 0.0707): the paper's direction, not shown "
        "beyond noise.",
        "- ID-only: 0.3600 vs 0.3500 (+2.9%): removing text and image does not lower NDCG@10 here: not the paper's "
        "direction.",
    ]
    assert ablation_lines([_result("SASRec", 0, 0.1)]) == []


def test_run_experiments_smoke(tiny_catalog, tmp_path, monkeypatch):
    run_split("tiny", SplitParams(), tiny_catalog)
    params = Params.model_validate({
        "catalogs": {"tiny": {"reviews": "file:unused"}},
        "project": {"device": "cpu"},
        "train": {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "ffn_size": 32, "batch_size": 64},
    })
    out = tmp_path / "report.md"
    text = run_experiments("tiny", params, tiny_catalog, [0], ["CAMMSR", "SASRec"], out, overrides={"epochs": 1})
    assert out.read_text() == text
    assert "| CAMMSR | 1 |" in text and "| SASRec | 1 |" in text and "--epochs 1" in text
    runs = sorted(p.parent for p in (tiny_catalog.root / "experiments").glob("*/seed0-*/metrics.json"))
    assert [p.parent.name for p in runs] == ["cammsr", "sasrec"]
    # the untrained baselines, once per report, equal what each run's evaluate stage measured for them
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    for ranker, name in (("popularity", "most-popular"), ("text_knn", "text kNN (untrained)")):
        if ranker in metrics:
            assert f"- {name}: test NDCG@10 {metrics[ranker]['test']['ndcg@10']:.4f}, masked " in text
    assert "- most-popular: test NDCG@10" in text
    mtimes = {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*") if p.is_file()}

    # a second call reuses the finished runs: nothing is trained or evaluated, no run file is rewritten
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiments, "run_train", no_training)
    monkeypatch.setattr(experiments, "run_evaluate", no_training)
    again = run_experiments("tiny", params, tiny_catalog, [0], ["SASRec"], out, overrides={"epochs": 1})
    row = next(line for line in text.splitlines() if line.startswith("| SASRec |"))
    assert row.rsplit(" | ", 1)[0] in again  # the same metrics, epoch time and epochs, read back from the run
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a changed setting is another run, not a stale reuse
    with pytest.raises(AssertionError, match="trained again"):
        run_experiments("tiny", params, tiny_catalog, [0], ["SASRec"], out, overrides={"epochs": 2})


def test_set_overrides_are_typed_and_checked():
    from cammsr.core.config import TrainParams
    from cammsr.train.experiments import train_overrides

    assert train_overrides(["lr=0.002", "use_text=false", "dropout=0.3"], TrainParams()) == \
        {"lr": 0.002, "use_text": False, "dropout": 0.3}
    for bad, message in (("lr", "key=value"), ("lr_rate=1", "unknown train params"), ("dropout=2", "dropout")):
        with pytest.raises(ValueError, match=message):
            train_overrides([bad], TrainParams())


def test_feature_source_names_the_encoder_the_imported_file_or_none(tiny_catalog):
    params = Params(catalogs={"tiny": {"reviews": "file:r.json", "image_features": {
        "file": "file:///x/features/Scientific.feat3CLS", "index": "file:///x/features/Scientific.item2index",
        "provenance": "CLIP ViT-B/32"}}})
    assert feature_source(params, "tiny", "text") == f"`{params.features.text.model}`"
    assert feature_source(params, "tiny", "image") == "imported from `Scientific.feat3CLS` (CLIP ViT-B/32)"
    write_rows(tiny_catalog.split_features("text"), FeatureRows([], [], np.zeros((0, 4), np.float32)))
    assert feature_source(params, "tiny", "text", tiny_catalog) == "none (no item of the catalog has any)"
    write_rows(tiny_catalog.split_features("text"), FeatureRows(["i1"], ["s"], np.ones((1, 4), np.float32)))
    assert feature_source(params, "tiny", "text", tiny_catalog) == f"`{params.features.text.model}`"
