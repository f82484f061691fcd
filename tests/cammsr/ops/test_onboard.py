"""cammsr/ops/onboard.py: the plan (check + params edit) touches nothing; applying it moves the files and
writes params.yaml; every refusal leaves params.yaml byte-identical and no staging folder behind.

(`cammsr onboard` end to end, through the CLI and the Prefect flow, is tests/integration/test_onboard.py.)
"""

from __future__ import annotations

import hashlib

import pytest
import yaml

from cammsr.core.config import DemoParams
from cammsr.ingest.download import RetryPolicy, raw_name
from cammsr.ops.onboard import apply_plan, discard_plan, parse_images, plan_onboarding, source_dep
from cammsr.ops.params_edit import ParamsEditError
from cammsr.ops.source_check import SourceError
from demo.generate import META_FILE, REVIEWS_FILE, generate_demo
from tests.params_builder import tiny_params, write_params

FAST = RetryPolicy(retries=0, timeout_s=5.0, backoff_base_s=0.01)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """A small generated catalog in the Amazon-2018 layout: one item has no metadata, one line is malformed."""
    out = tmp_path_factory.mktemp("src")
    generate_demo(out, DemoParams(n_users=40, n_items=20, n_categories=2, mean_length=6.0, image_size=16, seed=5))
    return {"reviews": (out / REVIEWS_FILE).read_bytes(), "meta": (out / META_FILE).read_bytes()}


@pytest.fixture
def project(tmp_path):
    """A project folder with the test's own params.yaml (the demo catalog only)."""
    write_params(tmp_path / "params.yaml", tiny_params())
    return tmp_path


def _serve(httpserver, files):
    for kind, body in files.items():
        httpserver.expect_request(f"/{kind}.json.gz").respond_with_data(
            body, headers={"ETag": '"' + hashlib.sha256(body).hexdigest()[:16] + '"'})
    return httpserver.url_for("/reviews.json.gz"), httpserver.url_for("/meta.json.gz")


def _plan(project, *args, **kw):
    return plan_onboarding(*args, root=project, params_path=project / "params.yaml", policy=FAST, **kw)


def _staging(project):
    return sorted(p.name for p in (project / "data").glob(".onboard-*"))


def test_images_auto_follows_the_metadata(project, httpserver, demo_files):
    """Relative image paths in http metadata resolve to URLs: auto turns images on; `no` keeps them off."""
    reviews, meta = _serve(httpserver, demo_files)
    auto = _plan(project, "web", reviews, meta, "auto")
    off = _plan(project, "web", reviews, meta, "no")
    assert auto.entry == {"reviews": reviews, "meta": meta, "images": True, "source_dep": reviews}
    assert off.entry["images"] is False
    assert auto.lines()[-1].startswith("modalities: id yes: ") and "image yes: " in auto.lines()[-1]
    assert "image no: --images no" in off.lines()[-1]
    assert auto.report.described == auto.report.items - 1  # the demo's item without metadata
    for plan in (auto, off):
        discard_plan(plan)
    assert _staging(project) == []


def test_a_plan_changes_nothing_and_applying_it_moves_the_files_and_adds_the_entry(project, httpserver, demo_files):
    reviews, meta = _serve(httpserver, demo_files)
    before = (project / "params.yaml").read_text()
    plan = _plan(project, "web", reviews, meta, "yes")
    assert (project / "params.yaml").read_text() == before and not (project / "data" / "web").exists()
    assert plan.old_text == before and plan.diff().startswith("--- params.yaml (now)\n+++ params.yaml (after")
    assert [p.name for p in (project / "data").iterdir()] == [plan.staging.name]

    paths = apply_plan(plan, project / "data")
    assert yaml.safe_load((project / "params.yaml").read_text())["catalogs"] == {
        "demo": tiny_params()["catalogs"]["demo"], "web": plan.entry}
    assert (project / "params.yaml").read_text() == plan.new_text
    assert sorted(p.name for p in paths.raw_dir.iterdir()) == sorted(["manifest.json", raw_name(reviews),
                                                                      raw_name(meta)])
    assert (paths.raw_dir / raw_name(reviews)).read_bytes() == demo_files["reviews"]  # ingest will not fetch again
    assert _staging(project) == []


def test_applying_after_params_yaml_changed_is_refused_and_writes_nothing(project, httpserver, demo_files):
    reviews, meta = _serve(httpserver, demo_files)
    plan = _plan(project, "web", reviews, meta)
    edited = (project / "params.yaml").read_text() + "# a hand edit meanwhile\n"
    (project / "params.yaml").write_text(edited)
    with pytest.raises(ParamsEditError, match="changed while onboarding; nothing written"):
        apply_plan(plan, project / "data")
    assert (project / "params.yaml").read_text() == edited
    assert not (project / "data" / "web").exists() and _staging(project) == []


def test_refusals_leave_params_yaml_and_the_data_folder_as_they_were(project):
    before = (project / "params.yaml").read_bytes()
    with pytest.raises(ValueError, match=r"catalog name '-x': use letters, digits"):
        _plan(project, "-x", "file:r.json", None)
    with pytest.raises(ValueError, match=r"--images must be yes, no or auto, not 'maybe'"):
        _plan(project, "web", "file:r.json", None, "maybe")
    with pytest.raises(ParamsEditError, match=r"catalogs\.demo exists already"):
        _plan(project, "demo", "file:r.json", None)
    with pytest.raises(SourceError, match=r"^file:nothere\.json: not reachable"):
        _plan(project, "web", "file:nothere.json", None)  # fails after the staging folder was made: it is removed
    assert (project / "params.yaml").read_bytes() == before
    assert _staging(project) == []


@pytest.mark.parametrize(("value", "choice"), [("yes", "yes"), ("True", "yes"), (False, "no"), (" AUTO ", "auto")])
def test_parse_images(value, choice):
    assert parse_images(value) == choice


def test_local_sources_watch_their_folder(tmp_path):
    (tmp_path / "src").mkdir()
    assert source_dep("file:src/r.json.gz", "file:src/m.json.gz", tmp_path) == "src"
    assert source_dep("file:src/a/r.json.gz", "file:src/b/m.json.gz", tmp_path) == "src"  # the common folder
    assert source_dep(f"file://{tmp_path}/src/r.json.gz", None, tmp_path / "elsewhere") == str(tmp_path / "src")
    assert source_dep("https://h/x/r.json.gz", "https://h/x/m.json.gz", tmp_path) == "https://h/x/r.json.gz"
    assert source_dep("file:src/r.json.gz", "https://h/m.json.gz", tmp_path) == "src"  # only local files count
    with pytest.raises(SourceError, match="share a folder"):
        source_dep("file:///a/r.json.gz", "file:///b/m.json.gz", tmp_path)
