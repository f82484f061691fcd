"""`cammsr` on inputs and faults that used to end in a traceback (or a bare ``Aborted.``): one line on stderr
naming the file, line or item and the reason; exit code 2 for bad input, 1 for a fault; ``--verbose`` adds
the traceback. Also the params that must be refused before anything runs (strict types, catalog names)."""

from __future__ import annotations

import errno
import gzip
import json
import os

import pytest
from typer.testing import CliRunner

from cammsr.core.config import ParamsError, load_params
from tests.params_builder import params_dict, write_params

T0 = 1_400_000_000


def _reviews(n: int = 40, users: int = 4) -> bytes:
    return "".join(json.dumps({"reviewerID": f"u{k % users}", "asin": f"I{k % 7}", "overall": 5.0,
                               "unixReviewTime": T0 + k, "reviewText": "x" * (k % 50)}) + "\n"
                   for k in range(n)).encode()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (cwd) whose params.yaml has catalog ``t`` reading ``src/r.json.gz``."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "r.json.gz").write_bytes(gzip.compress(_reviews()))
    write_params(tmp_path / "params.yaml",
                 params_dict({"t": {"reviews": "file:src/r.json.gz", "images": False, "source_dep": "src"}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cammsr(*args: str):
    from cammsr.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def assert_one_line(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == last_line(result), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ------------------------------------------------------------------------------------------- bad input: exit 2


def test_a_truncated_gzip_names_the_file_and_line(project):
    whole = gzip.compress(_reviews(5000))
    (project / "src" / "r.json.gz").write_bytes(whole[: len(whole) // 2])
    result = cammsr("ingest", "--catalog", "t")
    assert_one_line(result, 2, "file:src/r.json.gz: line ", "unreadable, gzip stream cut short")


def test_an_empty_file(project):
    (project / "src" / "r.json.gz").write_bytes(b"")
    assert_one_line(cammsr("ingest", "--catalog", "t"), 2, "file:src/r.json.gz: is empty (no records)")


def test_a_json_array_file(project):
    records = [json.loads(line) for line in _reviews().splitlines()]
    (project / "src" / "r.json.gz").write_bytes(gzip.compress(json.dumps(records, indent=1).encode()))
    result = cammsr("ingest", "--catalog", "t")
    assert_one_line(result, 2, "records quarantined", "a JSON array? expected JSON Lines")


def test_a_stage_error(project):
    (project / "src" / "r.json.gz").write_bytes(gzip.compress(_reviews(12, users=12)))  # one review per user
    assert cammsr("ingest", "--catalog", "t").exit_code == 0
    result = cammsr("split", "--catalog", "t")  # the 5/5-core is empty
    assert_one_line(result, 2, "interactions.parquet: nothing survives the 5/5-core filter",
                    "catalogs.t.min_interactions")


def test_bad_params_name_the_key(project):
    raw = params_dict({"t": {"reviews": "file:src/r.json.gz"}})
    raw["train"]["lr"] = "0.001"  # what a hand edit or `-S train.lr='"0.001"'` gives
    write_params(project / "params.yaml", raw)
    assert_one_line(cammsr("ingest", "--catalog", "t"), 2, "params.yaml: train.lr: Input should be a valid number")


def test_unknown_catalog(project):
    assert_one_line(cammsr("ingest", "--catalog", "nope"), 2, "catalog 'nope' is not in params.yaml")


# ------------------------------------------------------------------------------------------------ faults: exit 1


def test_a_full_disk_is_a_fault_naming_the_file(project, monkeypatch):
    real = os.replace

    def full(src, dst, *a, **kw):
        if str(dst).endswith("interactions.parquet"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr("cammsr.core.atomic.os.replace", full)
    result = cammsr("ingest", "--catalog", "t")
    assert_one_line(result, 1, "interactions.parquet: no space left on the device", "previous outputs are intact")
    assert not list((project / "data").rglob(".*.parquet"))  # no staged table left behind


def test_verbose_adds_the_traceback(project):
    (project / "src" / "r.json.gz").write_bytes(b"")
    result = cammsr("--verbose", "ingest", "--catalog", "t")
    assert result.exit_code == 2 and "Traceback (most recent call last)" in result.stderr
    assert last_line(result).startswith("error: file:src/r.json.gz: is empty")


# --------------------------------------------------------------------------------------- params refused at load


@pytest.mark.parametrize(("section", "value", "message"), [
    ({"train": {"lr": "0.001"}}, "train.lr", "Input should be a valid number"),
    ({"train": {"use_text": "no"}}, "train.use_text", "Input should be a valid boolean"),
    ({"train": {"epochs": 2.5}}, "train.epochs", "Input should be a valid integer"),
    ({"ingest": {"retries": "3"}}, "ingest.retries", "Input should be a valid integer"),
])
def test_numbers_and_booleans_are_strict(tmp_path, section, value, message):
    raw = params_dict({"t": {"reviews": "file:r.json"}})
    for key, over in section.items():
        raw[key].update(over)
    write_params(tmp_path / "params.yaml", raw)
    with pytest.raises(ParamsError, match=rf"{value}: {message}"):
        load_params(tmp_path / "params.yaml")


def test_ints_are_still_floats(tmp_path):
    raw = params_dict({"t": {"reviews": "file:r.json"}}, {"train": {"lr": 1}})
    assert load_params(write_params(tmp_path / "params.yaml", raw)).train.lr == 1.0


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", "", "x" * 65, "-x", "sp ace"])
def test_catalog_names_that_are_not_folder_names_are_refused(project, name):
    raw = params_dict({"t": {"reviews": "file:src/r.json.gz", "images": False}})
    raw["catalogs"] = {name: raw["catalogs"]["t"]}
    write_params(project / "params.yaml", raw)
    before = sorted(p.relative_to(project.parent).as_posix() for p in project.parent.rglob("*"))
    result = cammsr("ingest", "--catalog", name)
    assert_one_line(result, 2, "catalog name", "use letters, digits, '-' and '_'")
    assert sorted(p.relative_to(project.parent).as_posix() for p in project.parent.rglob("*")) == before


def test_a_catalog_folder_that_leads_outside_the_data_root_is_refused(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (project / "data").mkdir()
    (project / "data" / "t").symlink_to(outside, target_is_directory=True)
    result = cammsr("ingest", "--catalog", "t")
    assert_one_line(result, 2, "outside", str((project / "data").resolve()))
    assert list(outside.iterdir()) == []


def test_an_exit_a_command_chooses_is_not_reported_as_an_error(project):
    result = cammsr("report", "--catalog", "t")  # no metrics yet: `report` exits 1 by itself
    assert result.exit_code == 1 and "error:" not in result.output
