"""features/distributed.py: shards on a Prefect DaskTaskRunner give the same store as a local run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cammsr.core.config import ImageFeatureParams, TextFeatureParams
from cammsr.core.paths import CatalogPaths
from features.distributed import DaskPartsRunner, contiguous_shards, local_cluster, task_runner
from features.encode import encode_image, encode_text
from features.store import EncodedChunk, PartJob, parts_dir, plan_parts, read_rows, upsert
from tests.features.conftest import WORDS, image_bytes, write_images, write_items
from tests.features.fake_spec import Boom, FakeSpec, fake_vector

IDENTITY = {"modality": "text", "model": "fake"}


def job(n: int) -> PartJob:
    return PartJob(Path(f"part-{n}"), list(range(n)), [str(i) for i in range(n)], ["s"] * n, "{}")


@pytest.mark.parametrize(
    ("sizes", "n", "expected"),
    [
        ([3, 3, 3, 3], 2, [[3, 3], [3, 3]]),
        ([3, 3, 3], 2, [[3, 3], [3]]),  # the first shard reaches half (6 >= 4.5) after two chunks
        ([5, 1, 1, 1], 2, [[5], [1, 1, 1]]),
        ([2, 2], 4, [[2], [2]]),  # never an empty shard
        ([4], 3, [[4]]),
    ],
)
def test_contiguous_shards_keep_order_and_balance_items(sizes, n, expected):
    jobs = [job(s) for s in sizes]
    shards = contiguous_shards(jobs, n)
    assert [[len(j.positions) for j in shard] for shard in shards] == expected
    assert [j for shard in shards for j in shard] == jobs  # contiguous, in order, nothing lost


def test_task_runner_builds_the_local_cluster_or_joins_an_address():
    runner = task_runner(None, 3)
    assert runner.cluster_class is local_cluster and runner.cluster_kwargs == {"n_workers": 3}
    assert task_runner("tcp://10.0.0.1:8786", 3).address == "tcp://10.0.0.1:8786"


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes from `local_cluster` (what the runner starts when given no address),
    shared by the tests below so that the workers import torch once."""
    with local_cluster(2) as c:
        yield c


def _is_daemon(_: int) -> bool:
    import multiprocessing

    return multiprocessing.current_process().daemon


@pytest.mark.slow  # a two-worker Dask cluster
def test_workers_are_not_daemons_so_they_may_start_dataloader_workers(cluster):
    from distributed import Client

    with Client(cluster) as client:
        assert client.gather(client.map(_is_daemon, [0, 1], pure=False)) == [False, False]


@pytest.mark.slow  # a two-worker Dask cluster
def test_shard_failure_keeps_finished_parts_for_a_local_resume(tmp_path, cluster, prefect_harness):
    """2 workers, 2 shards of 2 chunks; the second shard dies on its last chunk."""
    store = tmp_path / "text.parquet"
    inputs = [f"text {k}" for k in range(8)]
    inputs[2] = "bad: unreadable"
    ids, shas = [f"i{k}" for k in range(8)], [f"h{k}" for k in range(8)]
    runner = DaskPartsRunner(FakeSpec(crash_on="text 7"), inputs, cluster.scheduler_address, n_workers=2)
    with pytest.raises(Boom, match="text 7"):
        upsert(store, ids, shas, IDENTITY, run_parts=runner, parallelism=2, chunk_size=2)
    assert not store.exists()
    done = sorted(p.name for p in parts_dir(store).glob("part-*.parquet"))
    assert done == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # chunk 4 died
    assert read_rows(parts_dir(store) / "part-00001.parquet").item_ids == ["i3"]  # i2 failed: no row

    resumed: list[list[int]] = []

    def encode(positions, progress):
        resumed.append(list(positions))
        chunk = FakeSpec().encode(0, [inputs[p] for p in positions])
        return type(chunk)([positions[i] for i in chunk.positions], chunk.embeddings,
                           {positions[i]: r for i, r in chunk.failures.items()})

    report = upsert(store, ids, shas, IDENTITY, encode, chunk_size=2)
    assert resumed == [[2, 6], [7]]  # the failed item is retried; finished chunks are not redone
    assert (report.resumed, report.encoded, report.total) == (5, 2, 7)
    assert report.failures == {"i2": "bad input"}
    rows = read_rows(store)
    assert rows.item_ids == [i for i in ids if i != "i2"]
    np.testing.assert_array_equal(rows.embeddings, np.stack([fake_vector(t) for t in inputs if t[:4] != "bad:"]))


def tiny_clip_dir(folder: Path) -> str:
    """An open_clip ``local-dir:`` model (config only: random weights), loadable in any process."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    return f"local-dir:{folder}"


def make_catalog(root: Path, n: int = 13) -> CatalogPaths:
    """``n`` items with texts of mixed length; every item but the last has an image, i03's is corrupt."""
    paths = CatalogPaths.of("shop", root)
    items = [
        {"item_id": f"i{k:02d}", "title": " ".join(WORDS[k % 7 : k % 7 + 1 + k % 5]), "brand": "acme"}
        for k in range(n)
    ]
    write_items(paths, items)
    images = {f"i{k:02d}": image_bytes((20 * k % 255, 90, 160), seed=k) for k in range(n - 1)}
    images["i03"] = b"not an image"
    write_images(paths, images)
    return paths


@pytest.mark.slow  # a two-worker Dask cluster
def test_dask_runner_with_two_workers_matches_the_local_run(tmp_path, tiny_bert, cluster, prefect_harness, caplog):
    text = TextFeatureParams(model=str(tiny_bert), max_length=32, batch_size=4)
    image = ImageFeatureParams(model=tiny_clip_dir(tmp_path / "clip"), batch_size=4, num_workers=0)
    local, dask = make_catalog(tmp_path / "local"), make_catalog(tmp_path / "dask")
    address = cluster.scheduler_address

    local_text = encode_text("shop", text, local, device="cpu")
    local_image = encode_image("shop", image, local, device="cpu")
    with caplog.at_level(logging.INFO, logger="features.distributed"):
        dask_text = encode_text("shop", text, dask, device="cpu", runner="dask", dask_address=address)
        dask_image = encode_image("shop", image, dask, device="cpu", runner="dask", dask_address=address)

    assert f"encoding 13 items in 2 shards on {address}" in caplog.text
    assert f"encoding 12 items in 2 shards on {address}" in caplog.text  # i12 has no image
    for store in ("text_features", "image_features"):
        a, b = read_rows(getattr(local, store)), read_rows(getattr(dask, store))
        assert a.item_ids == b.item_ids and a.shas == b.shas
        np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-4, atol=1e-5)
        assert not parts_dir(getattr(dask, store)).exists()
    assert read_rows(dask.image_features).item_ids == [f"i{k:02d}" for k in range(12) if k != 3]
    keys = ("encoded", "reused", "failed", "total", "dim")
    for a, b in ((local_text, dask_text), (local_image, dask_image)):
        assert {k: a.counts[k] for k in keys} == {k: b.counts[k] for k in keys}
    assert dask_image.counts["failed"] == 1 and "i03: cannot decode" in "\n".join(dask_image.notes)
    assert f"encoded on: dask {address}" in dask_text.notes

    # a refresh through Dask encodes only the edited item
    write_items(dask, [{"item_id": "i00", "title": "red car", "brand": "acme"}])
    again = encode_text("shop", text, dask, device="cpu", runner="dask", dask_address=address)
    assert {k: again.counts[k] for k in ("encoded", "reused", "removed", "total")} == {
        "encoded": 1, "reused": 0, "removed": 12, "total": 1
    }  # fmt: skip


def test_parallel_runs_split_the_work_into_even_chunks_per_worker(tmp_path):
    """5000 items, chunk_size 2048, 2 workers: 4 chunks of 1250 (2 per worker), not 2048+2048+904."""
    ids = [f"i{k}" for k in range(5000)]
    seen: list[int] = []

    def run_parts(jobs, progress):
        seen.extend(len(job.positions) for job in jobs)
        for job in jobs:
            job.write(EncodedChunk(job.positions, np.stack([fake_vector(ids[p]) for p in job.positions])))
        return {}

    report = upsert(tmp_path / "s.parquet", ids, ids, IDENTITY, run_parts=run_parts, parallelism=2, chunk_size=2048)
    assert seen == [1250, 1250, 1250, 1250] and report.encoded == 5000
    jobs = plan_parts(tmp_path / "x.parquet", ids, ids, range(5000), "{}", 1250)
    assert [len(shard) for shard in contiguous_shards(jobs, 2)] == [2, 2]
