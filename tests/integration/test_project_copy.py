"""The tiny project the end-to-end tests run is hermetic: its catalogs are the test's, whatever the
working params.yaml lists (a user who onboarded a catalog there must still be able to run `make test`)."""

import pytest
import yaml

from tests.integration.conftest import COPIED, REPO, copy_project_files, dvc, make_project_copy
from tests.params_builder import demo_catalog, params_dict, tiny_params, write_params

UNREACHABLE = {"reviews": "https://127.0.0.1:9/nowhere/reviews.json.gz", "meta": None, "images": False,
               "source_dep": "https://127.0.0.1:9/nowhere/reviews.json.gz"}
MINI = {"reviews": "file:src/r.json", "meta": None, "images": False, "source_dep": "src"}


@pytest.fixture
def onboarded_repo(tmp_path, monkeypatch):
    """The repo as a user has it after `cammsr onboard web`: the same code, one more catalog in params.yaml."""
    working = tmp_path / "repo"
    working.mkdir()
    for name in COPIED:
        (working / name).symlink_to(REPO / name)
    write_params(working / "params.yaml", params_dict({"demo": demo_catalog(), "web": UNREACHABLE}))
    monkeypatch.setitem(copy_project_files.__globals__, "REPO", working)  # where the builder copies from
    return working


def test_the_copy_has_the_tests_params_not_the_working_ones(onboarded_repo, tmp_path):
    root = copy_project_files(tmp_path / "proj")
    assert (root / "dvc.yaml").read_bytes() == (onboarded_repo / "dvc.yaml").read_bytes()
    assert yaml.safe_load((root / "params.yaml").read_text()) == tiny_params()
    assert list(tiny_params()["catalogs"]) == ["demo"]

    other = copy_project_files(tmp_path / "other", tiny_params({"mini": MINI}))
    assert yaml.safe_load((other / "params.yaml").read_text())["catalogs"] == {"mini": MINI}


@pytest.mark.slow  # git and DVC init, then DVC reads the copy's dvc.yaml (~5 s)
def test_dvc_expands_the_stages_for_the_tests_catalogs_only(onboarded_repo, tmp_path):
    root = make_project_copy(tmp_path / "proj")
    res = dvc(root, "stage", "list", "--name-only")
    assert res.returncode == 0, res.stderr
    per_catalog = {line.strip().split("@")[1] for line in res.stdout.splitlines() if "@" in line}
    assert per_catalog == {"demo"}, res.stdout
