"""A real catalog too small for the project's 5-core: refused by the source check before anything is written,
with the numbers and a ``--min-interactions`` that works; that option becomes the catalog's own k-core, which
the split uses; and an onboarding that stops later says how to finish or undo it (``--undo`` does)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cammsr.core.config import load_params
from cammsr.ingest.download import RetryPolicy
from cammsr.ops.onboard import apply_plan, plan_onboarding, undo_onboarding
from cammsr.ops.params_edit import ParamsEditError
from cammsr.ops.registry import split_params
from cammsr.ops.source_check import SourceError, check_source
from cammsr.ops.stages import Project, run_stage_now
from tests.params_builder import tiny_params, write_params

FAST = RetryPolicy(retries=0, timeout_s=5.0, backoff_base_s=0.01)
T0 = 1_400_000_000


def small_catalog(folder: Path, users: int = 30, per_user: int = 3, items: int = 20) -> str:
    """``users`` users with ``per_user`` reviews each over ``items`` items: every item has ~4.5 reviews."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"reviewerID": f"u{u}", "asin": f"I{(u + j) % items}", "overall": 4.0,
                         "unixReviewTime": T0 + 86400 * j}) for u in range(users) for j in range(per_user)]
    (folder / "reviews_Small.json.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    return f"file:{folder.name}/reviews_Small.json.gz"


@pytest.fixture
def project(tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml", tiny_params())
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_source_check_refuses_with_the_numbers_and_a_k_that_works(tmp_path):
    url = small_catalog(tmp_path / "src")
    with pytest.raises(SourceError) as err:
        check_source(url, None, tmp_path / "raw", policy=FAST, root=tmp_path, user_core=5, item_core=5)
    assert str(err.value) == (
        f"{url}: its 5/5-core keeps 0 of 90 interactions and no user with the 3 interactions leave-one-out needs "
        "(30 users, 0 with >= 5 reviews); with --min-interactions 3 the 3/3-core keeps 90 interactions, "
        "30 users (30 with a test target), 20 items")
    report = check_source(url, None, tmp_path / "raw", policy=FAST, root=tmp_path, user_core=3)
    assert report.core.line() == "3/3-core keeps 90 interactions, 30 users (30 with a test target), 20 items"


def test_a_catalog_no_k_core_can_split_is_refused_without_a_suggestion(tmp_path):
    url = small_catalog(tmp_path / "src", users=10, per_user=2)  # nobody has the 3 leave-one-out needs
    with pytest.raises(SourceError, match="and no k-core keeps one: no user has 3 reviews"):
        check_source(url, None, tmp_path / "raw", policy=FAST, root=tmp_path, user_core=5)


def test_onboarding_is_refused_before_params_yaml_is_touched(project):
    url = small_catalog(project / "src")
    before = (project / "params.yaml").read_bytes()
    from cammsr.cli import app

    result = CliRunner().invoke(app, ["onboard", "small", "--reviews", url, "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "params.yaml is unchanged" in result.stderr and "--min-interactions 3" in result.stderr
    assert (project / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in (project / "data").iterdir()) == []


def test_min_interactions_is_the_catalogs_own_k_core_and_the_split_uses_it(project):
    url = small_catalog(project / "src")
    plan = plan_onboarding("small", url, None, "no", root=project, policy=FAST, min_interactions=3)
    assert plan.entry["min_interactions"] == 3
    apply_plan(plan, project / "data")
    params = load_params(project / "params.yaml")
    assert params.catalogs["small"].min_interactions == 3
    assert (split_params(params, "small").user_core, split_params(params, "small").item_core) == (3, 3)
    assert split_params(params, "demo") is params.splits  # the others keep the project's k-core

    proj = Project.at(project)
    run_stage_now("ingest", "small", proj)
    summary = run_stage_now("split", "small", proj)
    assert summary.counts["users"] == 30 and summary.notes[0].startswith("3/3-core kept 90/90")


def test_undo_takes_out_what_onboarding_added_and_nothing_else(project):
    url = small_catalog(project / "src")
    original = (project / "params.yaml").read_bytes()
    apply_plan(plan_onboarding("small", url, None, "no", root=project, policy=FAST, min_interactions=3),
               project / "data")
    (project / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "ingest@demo": {"cmd": "cammsr ingest --catalog demo"},
        "ingest@small": {"cmd": "cammsr ingest --catalog small"},
        "split@small": {"cmd": "cammsr split --catalog small"}}}))
    (project / "data" / "small" / "interactions.parquet").write_bytes(b"x")

    done = undo_onboarding("small", root=project)
    assert (project / "params.yaml").read_bytes() == original
    assert not (project / "data" / "small").exists()
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == {"ingest@demo"}
    assert len(done) == 3

    with pytest.raises(ParamsEditError, match="catalogs.small is not there"):
        undo_onboarding("small", root=project)
    with pytest.raises(ParamsEditError, match="catalogs.demo was not added by `cammsr onboard`"):
        undo_onboarding("demo", root=project)  # a hand-written catalog is never cut out
    assert (project / "params.yaml").read_bytes() == original


def test_a_pipeline_that_stops_after_the_edit_says_how_to_finish_or_undo(project, monkeypatch):
    url = small_catalog(project / "src")
    from flows import onboard as flow
    from flows.dag import StagesFailed

    def stops(**kw):
        apply_plan(plan_onboarding(kw["name"], kw["reviews"], None, "no", root=project, policy=FAST,
                                   min_interactions=kw["min_interactions"]), project / "data")
        raise StagesFailed("stages that did not complete:\n  train[small]: Failed: boom")

    monkeypatch.setattr(flow, "onboard_catalog", stops)
    from cammsr.cli import app

    result = CliRunner().invoke(app, ["onboard", "small", "--reviews", url, "--min-interactions", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert "small was added to params.yaml, but its pipeline stopped: stages that did not complete: " \
           "train[small]: Failed: boom" in result.stderr
    assert "to finish: fix the cause, then `dvc repro evaluate@small`" in result.stderr
    assert "to undo:   `cammsr onboard --undo small`" in result.stderr

    undone = CliRunner().invoke(app, ["onboard", "small", "--undo"], catch_exceptions=False)
    assert undone.exit_code == 0 and "small: onboarding undone" in undone.output
    assert "small" not in load_params(project / "params.yaml").catalogs
