"""Two runs of one stage of one catalog never overlap: the second waits, saying so, or stops under --no-wait.

Before the locks, two ingests of a catalog at once shared ``raw/<name>.part`` and one of them crashed.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pytest_httpserver import HTTPServer
from typer.testing import CliRunner
from werkzeug import Request, Response

from cammsr.core.errors import LockBusy
from cammsr.core.locks import holder, lock_path, output_lock
from cammsr.ops.registry import CATALOG_STAGES
from cammsr.ops.stages import Project, run_stage_now
from tests.params_builder import params_dict, write_params

T0 = 1_400_000_000
BODY = gzip.compress("".join(json.dumps({"reviewerID": f"u{k % 30}", "asin": f"I{k % 11}", "overall": 4.0,
                                         "unixReviewTime": T0 + k, "reviewText": "y" * (k % 300)}) + "\n"
                             for k in range(3000)).encode(), compresslevel=1)


def slow_body(_: Request) -> Response:
    """The reviews file a slice at a time: a download that takes ~0.6 s, so two runs overlap."""

    def chunks():
        step = len(BODY) // 12 + 1
        for start in range(0, len(BODY), step):
            time.sleep(0.05)
            yield BODY[start:start + step]

    return Response(chunks(), headers={"Content-Length": str(len(BODY)), "ETag": '"v1"'}, direct_passthrough=True)


@pytest.fixture
def project(tmp_path):
    server = HTTPServer(threaded=True)  # two downloads at once, as two processes would see them
    server.start()
    server.expect_request("/r.json.gz").respond_with_handler(slow_body)
    url = server.url_for("/r.json.gz")
    write_params(tmp_path / "params.yaml", params_dict({"t": {"reviews": url, "images": False, "source_dep": url}},
                                                       {"ingest": {"max_quarantine_fraction": 0.5}}))
    yield Project.at(tmp_path)
    server.clear()
    server.stop()


def test_two_ingests_of_one_catalog_at_once_both_succeed_one_after_the_other(project, caplog):
    results: list[object] = [None, None]

    def ingest(k: int) -> None:
        try:
            results[k] = run_stage_now("ingest", "t", project)
        except BaseException as exc:  # the test reports it below
            results[k] = exc

    threads = [threading.Thread(target=ingest, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)  # the second starts while the first is downloading
    for t in threads:
        t.join(60)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert "another run is writing these outputs" in caplog.text and "waiting for it to finish" in caplog.text
    paths = project.paths("t")
    assert pq.read_table(paths.interactions).num_rows == 3000
    assert sorted(p.name for p in paths.raw_dir.iterdir()) == sorted(["manifest.json", *[
        p.name for p in paths.raw_dir.iterdir() if p.name.endswith("r.json.gz")]])  # no .part left
    assert [r.counts["interactions"] for r in results] == [3000, 3000]


def test_no_wait_stops_at_once_with_who_holds_it(project, monkeypatch):
    monkeypatch.chdir(project.root)
    data = project.root / "data"
    with output_lock(lock_path(data, "ingest@t"), "test"):
        assert holder(lock_path(data, "ingest@t")).startswith("pid ")
        from cammsr.cli import app

        result = CliRunner().invoke(app, ["ingest", "--catalog", "t", "--no-wait"], catch_exceptions=False)
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ingest of catalog t: another run is writing these outputs (pid ")
    assert not (data / "t" / "interactions.parquet").exists()
    assert holder(lock_path(data, "ingest@t")) == ""  # released with the block


@pytest.mark.parametrize("stage", [s for s in CATALOG_STAGES if s != "ingest"])
def test_every_stage_takes_the_lock_of_its_outputs(project, stage):
    """encode, split, train, evaluate (and any stage registered later) run under their own lock."""
    with output_lock(lock_path(project.root / "data", f"{stage}@t"), "test"), pytest.raises(LockBusy, match=stage):
        run_stage_now(stage, "t", project, wait=False)


def test_a_waiting_run_goes_on_when_the_holder_finishes(tmp_path):
    lock = lock_path(tmp_path, "train@t")
    order: list[str] = []
    released = threading.Event()

    def hold() -> None:
        with output_lock(lock, "first"):
            order.append("first in")
            released.wait(5)
            order.append("first out")

    first = threading.Thread(target=hold)
    first.start()
    while not order:
        time.sleep(0.01)
    threading.Timer(0.3, released.set).start()
    with output_lock(lock, "second", wait=True):
        order.append("second in")
    first.join()
    assert order == ["first in", "first out", "second in"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    import subprocess
    import sys

    lock = lock_path(tmp_path, "ingest@t")
    code = (f"from cammsr.core.locks import output_lock; import os, signal\n"
            f"with output_lock({str(lock)!r}, 'x'):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == -9
    with output_lock(lock, "after", wait=False):  # the kernel released it with the process
        pass
