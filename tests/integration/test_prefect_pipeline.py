"""The Prefect pipeline flow runs the same stage functions as `dvc repro`, gives the same outputs,
leaves dvc.lock agreeing with them, and publishes a markdown artifact."""

import json

import numpy as np
import polars as pl
import pytest

from tests.integration.conftest import dvc, make_project_copy

pytestmark = pytest.mark.slow  # a Prefect run of the whole DAG, compared with `dvc repro`'s
STAGES = ["demo_source", "ingest", "encode_text", "encode_image", "split", "split_features", "train", "evaluate",
          "recommend"]


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, prefect_harness):
    """A fresh tiny project run by the flow alone (the working directory stays elsewhere)."""
    root = make_project_copy(tmp_path_factory.mktemp("flowproj"))
    from flows.pipeline import pipeline

    return root, pipeline(catalogs=["demo"], root=str(root))


def test_flow_runs_every_stage_once(flow_project):
    _, result = flow_project
    assert [s["stage"] for s in result["demo"]] == STAGES
    assert [s["target"] for s in result["demo"]] == ["demo_source"] + [f"{s}@demo" for s in STAGES[1:]]
    assert not any(s["skipped"] for s in result["demo"])


def test_flow_outputs_equal_dvc_outputs(flow_project, dvc_project):
    root, _ = flow_project
    a, b = root / "data" / "demo", dvc_project / "data" / "demo"
    for table in ("interactions.parquet", "items.parquet", "images.parquet", "splits/items.parquet",
                  "splits/sequences.parquet"):
        assert pl.read_parquet(a / table).equals(pl.read_parquet(b / table)), table
    for store in ("features/text.parquet", "features/image.parquet"):
        fa, fb = pl.read_parquet(a / store).sort("item_id"), pl.read_parquet(b / store).sort("item_id")
        assert fa["item_id"].equals(fb["item_id"]) and fa["content_sha256"].equals(fb["content_sha256"])
        np.testing.assert_allclose(np.stack(fa["embedding"].to_list()), np.stack(fb["embedding"].to_list()),
                                   rtol=1e-5, atol=1e-6)
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    for ranker in ("model", "popularity"):
        for k, v in ma[ranker]["test"].items():
            assert v == pytest.approx(mb[ranker]["test"][k], abs=1e-6), (ranker, k)


def test_dvc_has_nothing_to_do_after_the_flow(flow_project):
    root, _ = flow_project
    status = dvc(root, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    lock = (root / "dvc.lock").read_bytes()
    repro = dvc(root, "repro")
    assert repro.returncode == 0, repro.stderr
    assert "Running stage" not in repro.stdout
    assert all(f"Stage '{t}' didn't change, skipping" in repro.stdout
               for t in ["demo_source"] + [f"{s}@demo" for s in STAGES[1:]])
    assert (root / "dvc.lock").read_bytes() == lock


def test_flow_publishes_stage_table_and_metrics(flow_project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-demo"])))
    full_runs = [a.data for a in artifacts if all(f"| {s} | ran |" in a.data for s in STAGES)]  # this module's run
    assert full_runs, [a.data[:300] for a in artifacts]
    md = full_runs[0]
    assert md.startswith("# pipeline: demo\n\n| stage | status | counts | seconds |")
    assert "| demo | hr@5 |" in md and "| most-popular |" in md
