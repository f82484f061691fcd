"""cammsr/ops/dvc_sync.py on a tiny DVC project of its own: one foreach stage, ``copy@a`` and ``copy@b``,
that repeats ``src/<key>.txt`` ``n`` times (``n`` from params.yaml) into ``out/<key>.txt``.

A driver other than `dvc repro` calls a stage through `DvcSync.run`: skipped with its last summary when
dvc.lock says it is up to date, else called and recorded, so `dvc status` is clean afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cammsr.core.summary import StageSummary
from cammsr.ops.dvc_sync import DvcSync, DvcSyncError, last_summary
from tests.integration.conftest import dvc, project_env

DVC_YAML = {"stages": {"copy": {"foreach": "${catalogs}", "do": {
    "cmd": "python copy.py ${key}",  # what `dvc repro` would run; here the tests call the stage themselves
    "deps": ["src/${key}.txt"],
    "params": ["catalogs.${key}"],
    "outs": ["out/${key}.txt", {"summaries/${key}.json": {"cache": False}}],
}}}}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The project, initialised once (git + DVC); each test works on a copy."""
    root = tmp_path_factory.mktemp("dvcsync") / "proj"
    (root / "src").mkdir(parents=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"catalogs": {"a": {"n": 2}, "b": {"n": 3}}}))
    (root / "src" / "a.txt").write_text("a")
    (root / "src" / "b.txt").write_text("b")
    env = project_env()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    return root


@pytest.fixture
def root(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "proj", symlinks=True))


class CopyStage:
    """The stage function for one key; counts its calls, can be told to fail."""

    def __init__(self, root: Path, key: str, fail: bool = False):
        self.root, self.key, self.fail, self.calls = root, key, fail, 0

    def __call__(self) -> StageSummary:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the stage broke")
        n = yaml.safe_load((self.root / "params.yaml").read_text())["catalogs"][self.key]["n"]
        text = (self.root / "src" / f"{self.key}.txt").read_text() * n
        (self.root / "out").mkdir(exist_ok=True)
        (self.root / "out" / f"{self.key}.txt").write_text(text)
        summary = StageSummary("copy", self.key, {"chars": len(text)}, 0.5, ["copied"])
        summary.write(self.summary_path)
        return summary

    @property
    def summary_path(self) -> Path:
        return self.root / "summaries" / f"{self.key}.json"


def _stale(root: Path) -> list[str]:
    """What `dvc status` lists, asked in this process (a `dvc` subprocess costs a second of imports)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(k.rsplit(":", 1)[-1] for k in repo.status())


def test_the_in_process_status_agrees_with_the_command(root):
    res = dvc(root, "status", "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(k.rsplit(":", 1)[-1] for k in json.loads(res.stdout)) == _stale(root) == ["copy@a", "copy@b"]


def _lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def test_a_stage_dvc_would_run_is_called_then_recorded_so_dvc_status_is_clean(root):
    sync = DvcSync.for_project(root, root / "params.yaml")
    assert sync.enabled and not sync.is_up_to_date("copy@a")
    stage = CopyStage(root, "a")
    outcome = sync.run("copy@a", stage, stage.summary_path)

    assert stage.calls == 1 and not outcome.skipped and outcome.target == "copy@a"
    assert outcome.summary.counts == {"chars": 2}  # "a" twice
    assert _stale(root) == ["copy@b"]  # only the stage that ran is recorded
    out = _lock(root)["copy@a"]["outs"]
    assert {o["path"]: o.get("md5") for o in out}["out/a.txt"] == hashlib.md5(b"aa").hexdigest()
    assert _lock(root)["copy@a"]["params"]["params.yaml"] == {"catalogs.a": {"n": 2}}
    assert sync.is_up_to_date("copy@a")


def test_an_up_to_date_stage_is_not_called_and_reports_its_last_summary(root):
    sync = DvcSync.for_project(root, root / "params.yaml")
    first = CopyStage(root, "a")
    sync.run("copy@a", first, first.summary_path)
    lock, out = (root / "dvc.lock").read_bytes(), root / "out" / "a.txt"
    mtime = out.stat().st_mtime_ns

    again = CopyStage(root, "a", fail=True)  # would raise if called
    outcome = sync.run("copy@a", again, again.summary_path)
    assert again.calls == 0 and outcome.skipped
    assert outcome.summary.counts == {"chars": 2} and outcome.summary.seconds == 0.5
    assert outcome.summary.notes == ["up to date in dvc.lock: not rerun", "copied"]
    assert outcome.line() == "copy@a: up to date in dvc.lock, not rerun"
    assert out.stat().st_mtime_ns == mtime and (root / "dvc.lock").read_bytes() == lock


@pytest.mark.parametrize("change", ["dep", "param"])
def test_a_changed_dep_or_param_reruns_and_records_the_new_state(root, change):
    sync = DvcSync.for_project(root, root / "params.yaml")
    stage = CopyStage(root, "a")
    sync.run("copy@a", stage, stage.summary_path)
    if change == "dep":
        (root / "src" / "a.txt").write_text("A")
    else:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["catalogs"]["a"]["n"] = 4
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert not sync.is_up_to_date("copy@a")

    outcome = sync.run("copy@a", stage, stage.summary_path)
    assert stage.calls == 2 and not outcome.skipped
    expected = b"AA" if change == "dep" else b"aaaa"
    assert (root / "out" / "a.txt").read_bytes() == expected
    outs = {o["path"]: o.get("md5") for o in _lock(root)["copy@a"]["outs"]}
    assert outs["out/a.txt"] == hashlib.md5(expected).hexdigest()
    assert _stale(root) == ["copy@b"]


def test_force_calls_an_up_to_date_stage(root):
    sync = DvcSync.for_project(root, root / "params.yaml")
    stage = CopyStage(root, "b")
    sync.run("copy@b", stage, stage.summary_path)
    outcome = sync.run("copy@b", stage, stage.summary_path, force=True)
    assert stage.calls == 2 and not outcome.skipped and outcome.summary.counts == {"chars": 3}
    assert _stale(root) == ["copy@a"]


def test_a_failing_stage_is_not_recorded(root):
    sync = DvcSync.for_project(root, root / "params.yaml")
    stage = CopyStage(root, "a", fail=True)
    with pytest.raises(RuntimeError, match="the stage broke"):
        sync.run("copy@a", stage, stage.summary_path)
    assert not (root / "dvc.lock").exists() and _stale(root) == ["copy@a", "copy@b"]


def test_an_unknown_stage_or_catalog_is_an_error_naming_it(root):
    sync = DvcSync.for_project(root, root / "params.yaml")
    for target in ("nope@a", "copy@zz"):
        stage = CopyStage(root, "a")
        message = rf"^dvc\.yaml has no stage '{target}' \(is the catalog in params\.yaml\?\)$"
        with pytest.raises(DvcSyncError, match=message):
            sync.run(target, stage, stage.summary_path)
        assert stage.calls == 0


def test_sync_is_off_for_another_params_file_or_no_dvc_project(root, tmp_path, caplog):
    other = tmp_path / "other-params.yaml"
    shutil.copy(root / "params.yaml", other)
    with caplog.at_level(logging.WARNING, logger="cammsr.ops.dvc_sync"):
        sync = DvcSync.for_project(root, other)
    assert not sync.enabled
    assert sync.reason == f"{other} is not {root.resolve() / 'params.yaml'}, which dvc.yaml's stages read"
    assert "DVC sync off: " in caplog.text and "dvc.lock will not record this run" in caplog.text

    stage = CopyStage(root, "a")
    for _ in range(2):  # never skipped, never recorded: the lock would lie about the params used
        assert not sync.run("copy@a", stage, stage.summary_path).skipped
    assert stage.calls == 2 and not (root / "dvc.lock").exists()

    bare = tmp_path / "bare"
    bare.mkdir()
    off = DvcSync.for_project(bare, bare / "params.yaml")
    assert not off.enabled and off.reason == f"{bare.resolve()} is not a DVC project (no dvc.yaml or .dvc/)"


def test_last_summary_of_a_missing_or_broken_file_is_an_empty_one(tmp_path):
    missing = last_summary("split@demo", tmp_path / "none.json")
    assert (missing.stage, missing.catalog, missing.counts) == ("split", "demo", {})
    assert missing.notes == ["up to date in dvc.lock: not rerun"]
    (tmp_path / "bad.json").write_text("{not json")
    assert last_summary("demo_source", tmp_path / "bad.json").catalog == "demo_source"  # no @: named after itself
