"""`dvc repro` of the whole DAG on a tiny demo catalog, in a temp copy of the project."""

import json

import polars as pl
import yaml

from tests.integration.conftest import dvc


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
    for ranker in ("model", "popularity"):
        assert set(metrics[ranker]["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}
    ingest = json.loads((d / "summaries" / "ingest.json").read_text())["counts"]
    assert ingest["quarantined"] >= 1  # the demo plants one malformed line
    assert ingest["duplicates_dropped"] == 1
    images = pl.read_parquet(d / "images.parquet")
    assert (images["status"] == "ok").sum() >= 1
    assert images["status"].str.starts_with("failed").sum() >= 1  # the planted corrupt image
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
