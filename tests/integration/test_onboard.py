"""`cammsr onboard`: a good source over loopback HTTP onboards and trains on what it has; a bad source
(404, wrong format, empty, swapped files) is a clear error and leaves params.yaml byte-identical."""

import difflib
import gzip
import hashlib
import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from cammsr.core.config import DemoParams
from cammsr.data.splits import load_splits
from demo.generate import generate_demo
from tests.integration.conftest import dvc, popularity_by_hand
from tests.params_builder import tiny_params, write_params

REVIEWS, META = "reviews_Web_5.json.gz", "meta_Web.json.gz"


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    """A small Amazon-2018 catalog: one item has no metadata, one line is malformed."""
    out = tmp_path_factory.mktemp("websrc")
    generate_demo(out, DemoParams(n_users=80, n_items=40, n_categories=3, mean_length=8.0, image_size=32, seed=11))
    return {"/" + REVIEWS: (out / "reviews_Demo_5.json.gz").read_bytes(),
            "/" + META: (out / "meta_Demo.json.gz").read_bytes()}


def _serve(httpserver, files):
    """Serve ``files`` with ETags (DVC checks an http dependency by its ETag, also on HEAD)."""
    for path, body in files.items():
        if body is None:
            httpserver.expect_request(path).respond_with_data("not found", status=404)
            continue
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        httpserver.expect_request(path).respond_with_data(body, content_type="application/gzip",
                                                          headers={"ETag": etag})


@pytest.fixture
def project(dvc_project, tmp_path, monkeypatch):
    """A copy of the tiny project after `dvc repro`, as the working directory."""
    root = tmp_path / "proj"
    shutil.copytree(dvc_project, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """Just the test's params.yaml (the demo catalog), as the working directory: enough for checks that stop
    before any stage."""
    write_params(tmp_path / "params.yaml", tiny_params())
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _onboard(*args):
    from cammsr.cli import app

    return CliRunner().invoke(app, ["onboard", *args], catch_exceptions=False)


def _words(text):
    return " ".join(text.split())


def _data_entries(root):
    return sorted(p.name for p in (root / "data").iterdir())


# ------------------------------------------------------------------------------------------ good source


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_good_http_source_onboards_and_trains_on_the_modalities_it_has(project, httpserver, source_files):
    _serve(httpserver, source_files)
    before = (project / "params.yaml").read_text()
    demo_files = {p: p.stat().st_mtime_ns for p in (project / "data/demo").rglob("*") if p.is_file()}
    reviews, meta = httpserver.url_for("/" + REVIEWS), httpserver.url_for("/" + META)

    res = _onboard("web", "--reviews", reviews, "--meta", meta, "--images", "no")
    assert res.exit_code == 0, res.output
    said = _words(res.output)
    assert "format amazon-2018" in said and "1 malformed" in said  # the planted bad line
    assert "model modalities: id,text" in said  # no images: the image modality is absent
    assert "most-popular" in said  # the metrics table beside the baseline

    after = (project / "params.yaml").read_text()
    added = [ln for ln in difflib.ndiff(before.splitlines(), after.splitlines()) if ln[:2] in ("- ", "+ ")]
    assert all(ln.startswith("+ ") for ln in added)  # comments, order and layout of the rest preserved
    assert yaml.safe_load(after)["catalogs"]["web"] == {"reviews": reviews, "meta": meta, "images": False,
                                                         "source_dep": reviews}
    metrics = json.loads((project / "data/web/metrics.json").read_text())
    split = load_splits(project / "data/web/splits")
    assert metrics["users"] == len(split.sequences)  # after the 5-core every user has a test target
    assert metrics["popularity"]["test"] == pytest.approx(popularity_by_hand(split, (5, 10, 20)), abs=1e-6)
    train = json.loads((project / "data/web/summaries/train.json").read_text())
    assert train["counts"]["modalities"] == "id,text"
    # only the new catalog ran; dvc.lock agrees with everything, the http source checked by its ETag
    assert {p: p.stat().st_mtime_ns for p in demo_files} == demo_files
    status = dvc(project, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    assert not [n for n in _data_entries(project) if n.startswith(".onboard")]


# ------------------------------------------------------------------------------------------- bad sources


def _missing(_):
    return {"/" + REVIEWS: None, "/" + META: None}


def _html(_):
    return {"/" + REVIEWS: b"<html><body>Moved</body></html>\n", "/" + META: b""}


def _empty(files):
    return {"/" + REVIEWS: b"", "/" + META: files["/" + META]}


def _empty_gzip(files):
    return {"/" + REVIEWS: gzip.compress(b"\n\n"), "/" + META: files["/" + META]}


def _swapped(files):
    return {"/" + REVIEWS: files["/" + META], "/" + META: files["/" + REVIEWS]}


@pytest.mark.slow  # the onboard flow on the Prefect test server (the errors themselves: tests/cammsr/ops/)
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(("make", "message"), [
    (_missing, "not reachable: HTTP 404"),
    (_html, "no line is a JSON (or Python-literal) record"),
    (_empty, "empty file (0 bytes, no records)"),
    (_empty_gzip, "empty file"),
    (_swapped, "this looks like a metadata file"),
])
def test_bad_source_is_a_clear_error_and_changes_nothing(bare, httpserver, source_files, make, message):
    _serve(httpserver, make(source_files))
    before, entries = (bare / "params.yaml").read_bytes(), _data_entries(bare)
    reviews = httpserver.url_for("/" + REVIEWS)

    res = _onboard("bad", "--reviews", reviews, "--meta", httpserver.url_for("/" + META))
    assert res.exit_code == 2, res.output
    said = _words(res.output)  # rich wraps long lines
    assert _words(message) in said and reviews in res.output.replace("\n", "")
    assert "params.yaml is unchanged" in said
    assert (bare / "params.yaml").read_bytes() == before
    assert _data_entries(bare) == entries  # no data/bad, no staging folder left


def test_dry_run_prints_the_diff_and_changes_nothing(bare, httpserver, source_files):
    _serve(httpserver, source_files)
    before, entries = (bare / "params.yaml").read_bytes(), _data_entries(bare)
    res = _onboard("web", "--reviews", httpserver.url_for("/" + REVIEWS), "--meta", httpserver.url_for("/" + META),
                   "--dry-run")
    assert res.exit_code == 0, res.output
    assert "+  web:" in res.output and "+    images: true" in res.output  # auto: the metadata has image paths
    assert "modalities: id yes" in res.output
    assert (bare / "params.yaml").read_bytes() == before and _data_entries(bare) == entries


def test_existing_name_is_refused(bare):
    res = _onboard("demo", "--reviews", "file:nowhere.json", "--dry-run")
    assert res.exit_code == 2 and "catalogs.demo exists already" in res.output
