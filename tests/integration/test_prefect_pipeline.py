"""The Prefect flow runs the same stage functions as `dvc repro` and produces the same outputs."""

import json

import numpy as np
import polars as pl
import pytest

from tests.integration.conftest import make_project_copy


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, prefect_harness):
    root = make_project_copy(tmp_path_factory.mktemp("flowproj"))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    from flows.pipeline import pipeline

    result = pipeline(catalogs=["demo"])
    mp.undo()
    return root, result


def test_flow_returns_every_stage_summary(flow_project):
    _, result = flow_project
    stages = [s["stage"] for s in result["demo"]]
    assert stages == ["ingest", "encode_text", "encode_image", "split", "train", "evaluate"]


def test_flow_outputs_equal_dvc_outputs(flow_project, dvc_project):
    root, _ = flow_project
    a, b = root / "data" / "demo", dvc_project / "data" / "demo"
    for table in ("interactions.parquet", "items.parquet", "splits/items.parquet", "splits/sequences.parquet"):
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
