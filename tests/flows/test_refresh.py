"""refresh-features: conditional re-download, re-normalize, incremental encode, downstream per params."""

import gzip
import json

import polars as pl
import pytest

from cammsr.core.config import DemoParams
from demo.generate import generate_demo
from flows.refresh import refresh_features, refresh_stages
from tests.integration.conftest import dvc, make_project_copy
from tests.params_builder import TINY, tiny_params

SOURCE = "sources/mini"
META = f"{SOURCE}/meta_Demo.json.gz"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A tiny project whose one catalog reads plain files (not the generated demo, which a refresh regenerates)."""
    catalogs = {"mini": {"reviews": f"file:{SOURCE}/reviews_Demo_5.json.gz", "meta": f"file:{META}",
                         "images": True, "source_dep": SOURCE}}
    root = make_project_copy(tmp_path_factory.mktemp("refresh"), tiny_params(catalogs))
    generate_demo(root / SOURCE, DemoParams(**TINY["demo"]))
    return root


def _by_stage(result):
    return {s["stage"]: s for s in result["mini"]}


def _stale(root):
    """The mini catalog's stages that `dvc status` lists (demo_source is in dvc.yaml but no catalog here uses it)."""
    res = dvc(root, "status", "--json")
    assert res.returncode == 0, res.stderr
    return sorted(k.rsplit(":", 1)[-1] for k in json.loads(res.stdout or "{}") if k.endswith("@mini"))


def _retitle_one_item(path, items):
    """Change the title of the first of ``items`` in a gzip JSON-lines metadata file; return its asin."""
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("title") and rec.get("asin") in items:
            rec["title"] = rec["title"] + " (new edition)"
            lines[i] = json.dumps(rec)
            path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
            return rec["asin"]
    raise AssertionError("no titled item")


def test_downstream_stages_follow_the_switch():
    assert refresh_stages(False) == ["ingest", "encode_text", "encode_image"]
    assert refresh_stages(False, recommend=True) == ["ingest", "encode_text", "encode_image", "recommend"]
    assert refresh_stages(True) == ["ingest", "encode_text", "encode_image", "split", "split_features", "train",
                                    "evaluate", "recommend"]


@pytest.fixture(scope="module")
def refreshes(mini, prefect_harness):
    """Three refreshes: from nothing; after one item's title changed; unchanged but with downstream."""
    first = refresh_features(root=str(mini))
    stale_after_first = _stale(mini)
    asin = _retitle_one_item(mini / META, set(pl.read_parquet(mini / "data/mini/items.parquet")["item_id"]))
    second = refresh_features(root=str(mini))
    third = refresh_features(root=str(mini), downstream=True)
    return first, stale_after_first, asin, second, third


@pytest.mark.slow  # three refresh flow runs with DVC sync
def test_first_refresh_builds_the_features_only(refreshes):
    first, stale, _, _, _ = refreshes
    s = _by_stage(first)
    assert list(s) == ["fetch_sources", "ingest", "encode_text", "encode_image"]  # downstream: false in params
    assert s["fetch_sources"]["counts"]["changed"] == 2
    assert not any(x.get("skipped") for x in first["mini"])
    text = s["encode_text"]["counts"]  # the demo's item without metadata has no title or description: no row
    assert text["encoded"] + text["no_text"] == s["ingest"]["counts"]["items"] and text["no_text"] == 1
    # what was not run is what DVC still lists; the rest agrees with dvc.lock
    assert stale == ["evaluate@mini", "recommend@mini", "split@mini", "split_features@mini", "train@mini"]


@pytest.mark.slow  # three refresh flow runs with DVC sync
def test_one_changed_item_encodes_one_item(refreshes):
    first, _, _, second, _ = refreshes
    s = _by_stage(second)
    assert s["fetch_sources"]["counts"]["changed"] == 1  # the metadata file; the reviews file was unchanged
    assert s["ingest"]["skipped"] is False
    assert s["encode_text"]["counts"]["encoded"] == 1
    assert s["encode_text"]["counts"]["reused"] == _by_stage(first)["encode_text"]["counts"]["encoded"] - 1
    # the images did not change: encode_image (which also reads items.parquet) reruns and encodes nothing
    assert s["encode_image"]["skipped"] is True or s["encode_image"]["counts"]["encoded"] == 0


@pytest.mark.slow  # three refresh flow runs with DVC sync
def test_unchanged_sources_skip_features_and_downstream_runs_when_asked(refreshes, mini):
    *_, third = refreshes
    s = _by_stage(third)
    assert s["fetch_sources"]["counts"] == {"files": 2, "changed": 0, "bytes_downloaded": 0}
    assert [s[k]["skipped"] for k in ("ingest", "encode_text", "encode_image")] == [True, True, True]
    assert [s[k]["skipped"] for k in ("split", "split_features", "train", "evaluate", "recommend")] == [False] * 5
    assert _stale(mini) == []


@pytest.mark.slow  # refresh flow runs with DVC sync, then a recommend
def test_a_refresh_with_recommend_ranks_an_added_item_without_retraining(refreshes, mini):
    """After the downstream refresh above (a trained model): an item added to the metadata is encoded and
    recommended by a refresh with ``recommend``, and nothing trains."""
    lines = gzip.decompress((mini / META).read_bytes()).decode().splitlines()
    record = next(r for r in map(json.loads, lines) if r.get("title"))
    record.update(asin="B0ADDED0001", title="A product added between two refreshes")
    (mini / META).write_bytes(gzip.compress(("\n".join([*lines, json.dumps(record)]) + "\n").encode()))
    model = (mini / "data/mini/models/model.pt").read_bytes()
    s = _by_stage(refresh_features(root=str(mini), recommend=True))
    assert list(s) == ["fetch_sources", "ingest", "encode_text", "encode_image", "recommend"]
    assert s["encode_text"]["counts"]["encoded"] == 1 and s["recommend"]["skipped"] is False
    assert (mini / "data/mini/models/model.pt").read_bytes() == model
    before = _by_stage(refreshes[-1])["recommend"]["counts"]
    assert s["recommend"]["counts"]["new_items"] == before["new_items"] + 1
    assert s["recommend"]["counts"]["items"] == before["items"] + 1
    recs = pl.read_parquet(mini / "data/mini/recommendations.parquet")
    assert recs["user_id"].n_unique() == s["recommend"]["counts"]["users"] == before["users"]
    # split and split_features see new inputs (their outputs would not change); train and evaluate do not
    assert _stale(mini) == ["split@mini", "split_features@mini"]
