"""`dvc repro` of the whole DAG on a tiny demo catalog, in a temp copy of the project."""

import json

import polars as pl
import pytest
import yaml

from cammsr.data.splits import load_splits
from tests.integration.conftest import dvc, popularity_by_hand

pytestmark = pytest.mark.slow  # every test here shares one `dvc repro` of the whole DAG (~40 s)


def _declared_outputs(root):
    """Every out / metrics / plots path of every stage, as DVC resolved them into dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return [out["path"] for stage in lock.values() for out in stage.get("outs", [])]


def test_dvc_lock_holds_every_registered_stage_with_the_registry_outputs(dvc_project):
    from cammsr.core.paths import CatalogPaths
    from cammsr.ops.registry import STAGES, stage_outputs

    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"]
    catalogs = yaml.safe_load((dvc_project / "params.yaml").read_text())["catalogs"]
    for spec in STAGES:
        for name in (catalogs if spec.per_catalog else ["demo"]):
            target = spec.target(name)
            assert target in lock, f"{target} did not run"
            expected = {str(p) for p in stage_outputs(spec, CatalogPaths.of(name, "data"))}
            assert {o["path"] for o in lock[target]["outs"]} == expected, target


def test_repro_produces_every_declared_output(dvc_project):
    missing = [p for p in _declared_outputs(dvc_project) if not (dvc_project / p).exists()]
    assert not missing, f"declared but not produced: {missing}"


def test_second_repro_has_nothing_to_do(dvc_project):
    res = dvc(dvc_project, "status")
    assert res.returncode == 0
    assert "up to date" in res.stdout.lower() or res.stdout.strip() in ("", "{}"), res.stdout
    res = dvc(dvc_project, "repro")
    assert res.returncode == 0
    assert "didn't change, skipping" in res.stdout and "Running stage" not in res.stdout, res.stdout


def test_metrics_and_ingest_summary(dvc_project):
    d = dvc_project / "data" / "demo"
    metrics = json.loads((d / "metrics.json").read_text())
    split = load_splits(d / "splits")
    names = {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}
    assert set(metrics["model"]["test"]) == names and metrics["users"] == len(split.sequences)
    assert metrics["popularity"]["test"] == pytest.approx(popularity_by_hand(split, (5, 10, 20)), abs=1e-6)
    rankers = ("model", "popularity", "text_knn", "image_knn", "model+text_knn", "model+image_knn")
    assert all(r in metrics for r in rankers)  # the demo has text and images: content kNN and late fusion
    for knn in ("text_knn", "image_knn"):  # the fusion weight is picked on validation, 0 (the model) included
        assert metrics[f"model+{knn}"]["valid"]["ndcg@10"] >= metrics["model"]["valid"]["ndcg@10"]
        assert metrics["fusion_beta"][f"model+{knn}"] >= 0
    for ranker in rankers:  # what any ranking's metrics obey
        m = metrics[ranker]["test"]
        assert all(m[f"mrr@{k}"] <= m[f"ndcg@{k}"] <= m[f"hr@{k}"] <= 1 for k in (5, 10, 20)), (ranker, m)
        assert m["hr@5"] <= m["hr@10"] <= m["hr@20"], (ranker, m)

    demo = json.loads((dvc_project / "data/sources/demo/demo_summary.json").read_text())
    ingest = json.loads((d / "summaries" / "ingest.json").read_text())["counts"]
    assert ingest["reviews_lines"] == demo["n_review_lines"] and ingest["interactions"] == demo["n_reviews"]
    assert ingest["quarantined"] == 1  # the demo's one malformed line
    assert ingest["duplicates_dropped"] == 1  # and its one exact duplicate
    assert ingest["items_without_meta"] == 1
    status = dict(pl.read_parquet(d / "images.parquet").select("item_id", "status").iter_rows())
    assert status.pop(demo["missing_meta_item"]) == status.pop(demo["missing_image_item"]) == "missing"
    assert status.pop(demo["corrupt_image_item"]).startswith("failed: undecodable")
    assert set(status.values()) == {"ok"} and len(status) == ingest["items"] - 3
    res = dvc(dvc_project, "metrics", "show")
    assert res.returncode == 0 and "popularity" in res.stdout


def test_editing_a_module_a_stage_imports_makes_dvc_rerun_that_stage(dvc_project):
    """splits.py is imported by split, and (for the leave-one-out cut at load time) by train and evaluate."""
    module = dvc_project / "cammsr" / "data" / "splits.py"
    original = module.read_text()
    try:
        module.write_text(original + "\n# an edit\n")
        res = dvc(dvc_project, "status")
        assert res.returncode == 0, res.stderr
        changed = {line.rstrip(":").strip() for line in res.stdout.splitlines() if line.endswith(":")
                   and not line.startswith(("\t", " "))}
        assert {"split@demo", "train@demo", "evaluate@demo"} <= changed, res.stdout
        assert not changed & {"ingest@demo", "encode_text@demo", "encode_image@demo", "demo_source"}, res.stdout
    finally:
        module.write_text(original)
    assert "up to date" in dvc(dvc_project, "status").stdout.lower()
