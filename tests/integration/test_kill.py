"""SIGKILL in the middle of a stage, then the same command again: the outputs are those of a run that was
never interrupted (no row lost or doubled), and nothing of the killed run is left behind.

Each test runs the real `cammsr` command in a subprocess, kills it (SIGKILL: no cleanup of any kind runs)
at a point the test waits for, reruns it, and compares with an uninterrupted run of the same stage in a
second project. Covered: ingest (mid-download of the reviews file, and mid-way through the images),
encode (between two finished chunks) and train (after an epoch). A recommend stage is not covered here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from cammsr.core.config import DemoParams
from demo.generate import META_FILE, REVIEWS_FILE, generate_demo
from features.store import read_rows
from tests.integration.conftest import REPO, project_env
from tests.params_builder import tiny_params, write_params

pytestmark = pytest.mark.slow  # each test starts the CLI twice and runs the stage once more in process


def cammsr(root: Path, *args: str, kill_when: Callable[[], bool] | None = None, timeout: float = 300):
    """Run ``cammsr ARGS`` in ``root``; with ``kill_when``, SIGKILL it as soon as that turns true."""
    env = project_env() | {"PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "cammsr.cli", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    if kill_when is not None:
        while not kill_when():
            assert proc.poll() is None, f"finished before the kill point:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        return proc
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-4000:]
    return proc


def uninterrupted(root: Path, stage: str, catalog: str) -> None:
    """The reference run, in this process (what the command does, without paying for a new interpreter)."""
    from cammsr.ops.stages import Project, run_stage_now

    run_stage_now(stage, catalog, Project.at(root))


def leftovers(catalog: Path) -> list[str]:
    """Temp files, partial downloads and temp folders under a catalog's folder."""
    return sorted(p.relative_to(catalog).as_posix() for p in catalog.rglob("*")
                  if p.name.startswith(".") or p.name.endswith((".part", ".validator", ".pass1", ".tmp"))
                  or p.name.endswith(".parts"))


def tables_equal(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        left, right = pq.read_table(a / name), pq.read_table(b / name)
        assert left.equals(right), name


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------------ ingest


class CatalogServer:
    """Serves a generated catalog; ``stall_reviews_at`` / ``stall_image`` hold a response mid-way until released."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = HTTPServer(threaded=True)
        self.server.no_handler_status_code = 404  # the demo's one missing image
        self.server.start()
        self.base = self.server.url_for("/").rstrip("/")
        self.stall_reviews_at: int | None = None
        self.stall_image: int | None = None
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.images_served = 0
        self.lock = threading.Lock()
        self.server.expect_request(f"/{REVIEWS_FILE}").respond_with_handler(self.reviews)
        self.server.expect_request(f"/{META_FILE}").respond_with_handler(self.plain)
        for image in (folder / "images").iterdir():
            self.server.expect_request(f"/images/{image.name}").respond_with_handler(self.image)

    def plain(self, request: Request) -> Response:
        data = (self.folder / request.path.lstrip("/")).read_bytes()
        return Response(data, headers={"ETag": f'"{len(data)}"'})

    def reviews(self, request: Request) -> Response:
        data = (self.folder / REVIEWS_FILE).read_bytes()
        etag = f'"{len(data)}"'
        if "Range" in request.headers:
            start = int(request.headers["Range"].split("=")[1].rstrip("-"))
            return Response(data[start:], status=206, headers={
                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "ETag": etag})
        cut = self.stall_reviews_at

        def body():
            yield data[:cut]
            if cut is not None and cut < len(data):
                self.stalled.set()
                self.release.wait(60)  # the client is killed meanwhile
                return
            yield data[cut:] if cut is not None else b""

        return Response(body(), headers={"Content-Length": str(len(data)), "ETag": etag}, direct_passthrough=True)

    def image(self, request: Request) -> Response:
        with self.lock:
            self.images_served += 1
            n = self.images_served
        if self.stall_image is not None and n >= self.stall_image:
            self.stalled.set()
            self.release.wait(60)
        return self.plain(request)

    def close(self) -> None:
        self.release.set()
        self.server.clear()
        self.server.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "demo"
    generate_demo(out, DemoParams(n_users=300, n_items=60, n_categories=3, mean_length=8.0, image_size=16, seed=3))
    return out  # image URLs are relative: resolved against the metadata's http URL, so served too


def serve(source: Path, tmp_path: Path) -> CatalogServer:
    folder = tmp_path / "served"
    shutil.copytree(source, folder)
    return CatalogServer(folder)


def project(root: Path, server: CatalogServer) -> Path:
    root.mkdir(parents=True)
    catalog = {"reviews": f"{server.base}/{REVIEWS_FILE}", "meta": f"{server.base}/{META_FILE}", "images": True,
               "source_dep": f"{server.base}/{REVIEWS_FILE}"}
    write_params(root / "params.yaml", tiny_params({"web": catalog}, {"ingest": {"concurrency": 2, "retries": 1}}))
    return root


INGEST_TABLES = ("interactions.parquet", "items.parquet", "images.parquet")


def assert_same_ingest(killed: Path, clean: Path) -> None:
    a, b = killed / "data/web", clean / "data/web"
    tables_equal(a, b, INGEST_TABLES)
    assert files(a / "images") == files(b / "images")
    assert (a / "quarantine.jsonl").read_text() == (b / "quarantine.jsonl").read_text()
    manifest = [{n: (e["sha256"], e["bytes"]) for n, e in json.loads((d / "raw/manifest.json").read_text()).items()}
                for d in (a, b)]
    assert manifest[0] == manifest[1]
    assert leftovers(a) == [] and leftovers(b) == []
    assert pq.read_table(a / "interactions.parquet").num_rows == json.loads(
        (b / "summaries/ingest.json").read_text())["counts"]["interactions"]


@pytest.mark.parametrize("where", ["reviews download", "images"])
def test_ingest_killed_then_rerun_equals_an_uninterrupted_ingest(source, tmp_path, where):
    server = serve(source, tmp_path)
    try:
        clean = project(tmp_path / "clean", server)
        uninterrupted(clean, "ingest", "web")
        killed = project(tmp_path / "killed", server)
        if where == "reviews download":
            server.stall_reviews_at = (server.folder / REVIEWS_FILE).stat().st_size // 2
        else:
            server.images_served, server.stall_image = 0, 20
        cammsr(killed, "ingest", "--catalog", "web", kill_when=server.stalled.is_set)
        catalog = killed / "data/web"
        left = leftovers(catalog)
        if where == "reviews download":
            assert any(p.endswith(".part") for p in left), left  # the partial download, to resume from
        else:
            assert any(p.startswith(".tmp/ingest/") for p in left), left  # the staged tables
            assert not (catalog / "interactions.parquet").exists()  # nothing half-committed
        server.stall_reviews_at = server.stall_image = None
        server.release.set()
        cammsr(killed, "ingest", "--catalog", "web")
    finally:
        server.close()
    assert_same_ingest(killed, clean)


def test_ingest_killed_while_parsing_leaves_nothing_the_rerun_does_not_clear(tmp_path):
    """Killed with its tables half-written: the rerun removes every temp file, wherever the killed run put it."""
    from benchmarks.ingest import write_catalog

    write_catalog(tmp_path / "src", scale=1, base_users=3000)  # ~27k reviews: parsing takes a second or more
    roots = []
    for name in ("clean", "killed"):
        root = tmp_path / name
        root.mkdir()
        catalog = {"reviews": f"file:{tmp_path}/src/reviews.json.gz", "meta": f"file:{tmp_path}/src/meta.json.gz",
                   "images": False, "source_dep": str(tmp_path / "src")}
        write_params(root / "params.yaml", tiny_params({"big": catalog}))
        roots.append(root)
    clean, killed = roots
    uninterrupted(clean, "ingest", "big")
    catalog = killed / "data/big"
    cammsr(killed, "ingest", "--catalog", "big",
           kill_when=lambda: any(p.name.startswith(".interactions.parquet.") for p in catalog.rglob("*")))
    assert leftovers(catalog) != []  # the killed run's temp files are there
    cammsr(killed, "ingest", "--catalog", "big")
    assert leftovers(catalog) == []
    tables_equal(catalog, clean / "data/big", INGEST_TABLES)


# ------------------------------------------------------------------------------------------------------ encode


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A project whose demo-like catalog (file: sources, 30 items) is ingested, ready to encode."""
    root = tmp_path_factory.mktemp("enc")
    generate_demo(root / "src", DemoParams(n_users=80, n_items=30, n_categories=3, mean_length=6.0,
                                           image_size=16, seed=5))
    catalog = {"reviews": f"file:src/{REVIEWS_FILE}", "meta": f"file:src/{META_FILE}", "images": False,
               "source_dep": "src"}
    write_params(root / "params.yaml", tiny_params({"c": catalog}, {
        "features": {"chunk_size": 4, "text": {"batch_size": 4, "max_length": 16}},
        "ingest": {"max_quarantine_fraction": 0.05}}))
    cammsr(root, "ingest", "--catalog", "c")
    return root


def test_encode_killed_between_chunks_then_rerun_equals_an_uninterrupted_encode(ingested, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for root in (clean, killed):
        shutil.copytree(ingested, root)
    uninterrupted(clean, "encode_text", "c")
    parts = killed / "data/c/features/text.parquet.parts"
    cammsr(killed, "encode", "--catalog", "c", "--modality", "text",
           kill_when=lambda: len(list(parts.glob("part-*.parquet"))) >= 2)
    assert not (killed / "data/c/features/text.parquet").exists()
    cammsr(killed, "encode", "--catalog", "c", "--modality", "text")

    summary = json.loads((killed / "data/c/summaries/encode_text.json").read_text())["counts"]
    assert summary["resumed"] >= 8 and summary["resumed"] + summary["encoded"] == summary["total"]
    a, b = read_rows(killed / "data/c/features/text.parquet"), read_rows(clean / "data/c/features/text.parquet")
    assert a.item_ids == b.item_ids and a.shas == b.shas  # every item once, in the same order
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=0, atol=1e-5)  # batch padding may differ
    assert leftovers(killed / "data/c") == []


# ------------------------------------------------------------------------------------------------------- train


def test_train_killed_after_an_epoch_then_rerun_equals_an_uninterrupted_training(tmp_path):
    from tests.cammsr.conftest import write_tiny_catalog

    roots = []
    for name in ("clean", "killed"):
        root = tmp_path / name
        paths = write_tiny_catalog(root, n_users=150, n_items=40, length=8)
        write_params(root / "params.yaml", tiny_params({"tiny": {"reviews": "file:none.json", "images": False}}, {
            "train": {"model": "sasrec", "epochs": 3, "patience": 10, "num_threads": 1, "hidden_size": 16},
            "splits": {"user_core": 1, "item_core": 1}}))
        uninterrupted(root, "split", "tiny")
        roots.append((root, paths))
    (clean, clean_paths), (killed, killed_paths) = roots
    uninterrupted(clean, "train", "tiny")
    last = killed_paths.models_dir / "last.pt"
    cammsr(killed, "train", "--catalog", "tiny", kill_when=last.exists)
    cammsr(killed, "train", "--catalog", "tiny")

    a = torch.load(killed_paths.checkpoint, weights_only=True)
    b = torch.load(clean_paths.checkpoint, weights_only=True)
    assert a.keys() == b.keys() and a["epoch"] == b["epoch"]
    for key, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], tensor), key
    counts = [json.loads(p.summary("train").read_text())["counts"] for p in (killed_paths, clean_paths)]
    for c in counts:
        c.pop("epoch_seconds"), c.pop("sequences_per_s")
    assert counts[0] == counts[1]
    assert sorted(os.listdir(killed_paths.models_dir)) == sorted(os.listdir(clean_paths.models_dir))
    assert leftovers(killed_paths.root) == []
