"""`dvc repro` of the whole DAG on a tiny demo catalog, in a temp copy of the project."""

import json

import polars as pl
import yaml

from tests.integration.conftest import dvc


def _declared_outputs(root):
    """Every out / metrics / plots path dvc.yaml declares for the catalogs in params.yaml."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    catalogs = yaml.safe_load((root / "params.yaml").read_text())["catalogs"]
    paths = []
    for stage in spec["stages"].values():
        names = list(catalogs) if "foreach" in stage else [None]
        body = stage.get("do", stage)
        for name in names:
            for kind in ("outs", "metrics", "plots"):
                for entry in body.get(kind, []):
                    p = entry if isinstance(entry, str) else next(iter(entry))
                    paths.append(p.replace("${key}", name) if name else p)
    return paths


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
