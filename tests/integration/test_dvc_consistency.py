"""One record of finished work: after `dvc repro` a Prefect run redoes nothing, and after a Prefect run
`dvc status` is clean and `dvc repro` does nothing (the from-scratch case is in test_prefect_pipeline.py)."""

import json
import shutil

import pytest
import yaml

from tests.integration.conftest import dvc

pytestmark = pytest.mark.slow  # `dvc repro` of the whole DAG, then Prefect runs of it
STAGES = ["demo_source", "ingest", "encode_text", "encode_image", "split", "split_features", "train", "evaluate",
          "recommend"]


def _copy(src, dest):
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _edit_params(root, section, key, value):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _stale(root):
    res = dvc(root, "status", "--json")
    assert res.returncode == 0, res.stderr
    return sorted(k.rsplit(":", 1)[-1] for k in json.loads(res.stdout or "{}"))


def _snapshot(root):
    return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted((root / "data").rglob("*")) if p.is_file()}


@pytest.mark.usefixtures("prefect_harness")
def test_after_dvc_repro_the_flow_redoes_nothing_even_on_dask(dvc_project, tmp_path):
    root = _copy(dvc_project, tmp_path / "proj")
    _edit_params(root, "orchestration", "task_runner", "dask")  # no stage reads `orchestration`
    assert _stale(root) == []
    before, lock = _snapshot(root), (root / "dvc.lock").read_bytes()
    from flows.pipeline import pipeline

    result = pipeline(catalogs=["demo"], root=str(root))
    assert [s["stage"] for s in result["demo"]] == STAGES
    assert all(s["skipped"] for s in result["demo"])
    last = json.loads((root / "data/demo/summaries/evaluate.json").read_text())
    evaluate = next(s for s in result["demo"] if s["stage"] == "evaluate")
    assert evaluate["counts"] == last["counts"]  # a skipped stage reports its last summary
    assert _snapshot(root) == before  # not one output rewritten
    assert (root / "dvc.lock").read_bytes() == lock


@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_reruns_what_dvc_would_and_leaves_dvc_nothing_to_do(dvc_project, tmp_path):
    root = _copy(dvc_project, tmp_path / "proj")
    _edit_params(root, "train", "epochs", 1)
    assert _stale(root) == ["train@demo"]
    from flows.pipeline import pipeline

    result = {s["stage"]: s for s in pipeline(catalogs=["demo"], root=str(root))["demo"]}
    assert result["train"]["skipped"] is False and result["train"]["counts"]["epochs_run"] == 1
    assert all(result[s]["skipped"] for s in STAGES[:6])
    assert _stale(root) == []
    repro = dvc(root, "repro")
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout + repro.stderr
    model = "data/demo/models/model.pt"  # evaluate's and recommend's dep: they rerun when training changed it
    same_model = (root / model).read_bytes() == (dvc_project / model).read_bytes()
    assert result["evaluate"]["skipped"] is same_model and result["recommend"]["skipped"] is same_model
