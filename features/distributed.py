"""Encoding on Dask workers through a Prefect task runner (``features.runner: dask``).

The store plans the chunks (`features.store.plan_parts`); `DaskPartsRunner` cuts them into one
contiguous shard per worker and runs each shard as a Prefect task on a
`prefect_dask.DaskTaskRunner`: a `LocalCluster` of ``dask_workers`` processes (one thread each),
or the scheduler at ``dask_address``. A worker builds the encoder from its picklable spec once,
encodes its chunks in order and writes each chunk's part file itself; the driver only watches
the parts folder for the progress bar, and the store merges the parts exactly as after a local
run. A killed run keeps every finished part, so the next run (local or Dask) resumes.

Workers must see the driver's filesystem (image files, the store's parts folder): always true
for a LocalCluster; for a remote cluster, mount the data directory on every worker.

A Prefect flow needs an API: the server at ``PREFECT_API_URL``, else Prefect's temporary server,
started here (some seconds) and named to the workers so that they do not each start their own.
Called from inside a Dask worker (a pipeline flow already on a DaskTaskRunner), the stage encodes
in its own process instead (see `features.encode`), rather than wait on the workers it occupies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from features.store import EncodedChunk, PartJob

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the driver looks for finished part files (progress bar only)


class EncoderSpec(Protocol):
    """A picklable recipe for an encoder (`features.text.TextSpec`, `features.image.ImageSpec`)."""

    def build(self) -> Any: ...

    def encode(
        self, encoder: Any, inputs: Sequence[Any], progress: Callable[[int], None] | None = None
    ) -> EncodedChunk: ...


@dataclass
class Shard:
    """What one worker gets: contiguous chunks, the encoder input of each of their positions."""

    spec: EncoderSpec
    jobs: list[PartJob]
    inputs: list[list[Any]]  # inputs[k][i]: encoder input of jobs[k].positions[i]
    torch_threads: int | None = None  # None leaves the worker's setting alone

    @property
    def size(self) -> int:
        return sum(len(job.positions) for job in self.jobs)


_ENCODERS: dict[str, Any] = {}  # per worker process: the model is loaded once, not once per shard


def _encoder_for(spec: EncoderSpec) -> Any:
    key = repr(spec)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one model per process is enough; free the previous one
        _ENCODERS[key] = spec.build()
    return _ENCODERS[key]


def encode_shard(shard: Shard) -> dict[int, str]:
    """On a worker: encode the shard's chunks in order, writing each chunk's part file.

    Returns {position: failure reason} for the items that could not be encoded.
    """
    if shard.torch_threads:
        import torch

        torch.set_num_threads(shard.torch_threads)
    encoder = _encoder_for(shard.spec)
    failures: dict[int, str] = {}
    for job, inputs in zip(shard.jobs, shard.inputs, strict=True):
        local = shard.spec.encode(encoder, inputs)  # positions are indices into `inputs`
        chunk = EncodedChunk(
            [job.positions[i] for i in local.positions],
            local.embeddings,
            {job.positions[i]: reason for i, reason in local.failures.items()},
        )
        job.write(chunk)
        failures.update(chunk.failures)
    return failures


def contiguous_shards(jobs: Sequence[PartJob], n: int) -> list[list[PartJob]]:
    """Split ``jobs`` (in order) into at most ``n`` contiguous, non-empty groups of near-equal items."""
    total = sum(len(job.positions) for job in jobs)
    shards: list[list[PartJob]] = []
    done = 0
    for job in jobs:
        # a new shard starts when the items so far have filled the current one's fair share
        if not shards or (len(shards) < n and done >= total * len(shards) / n):
            shards.append([])
        shards[-1].append(job)
        done += len(job.positions)
    return shards


def in_dask_worker() -> bool:
    """True inside a Dask worker (e.g. a pipeline flow already on a DaskTaskRunner)."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


@dataclass
class DaskPartsRunner:
    """A `features.store.PartRunner` that encodes the chunks on Dask workers.

    Attributes:
        spec: the encoder recipe, built once per worker.
        inputs: the encoder input of every position of the wanted rows (text, or (file, sha)).
        address: a Dask scheduler address; None starts a LocalCluster for the run.
        n_workers: LocalCluster workers, and the number of shards either way.
    """

    spec: EncoderSpec
    inputs: Sequence[Any]
    address: str | None = None
    n_workers: int = 2

    def __call__(self, jobs: Sequence[PartJob], progress: Callable[[int], None]) -> dict[int, str]:
        if not jobs:
            return {}
        threads = None if self.address else max(1, (os.cpu_count() or 1) // self.n_workers)
        shards = [
            Shard(self.spec, group, [[self.inputs[p] for p in job.positions] for job in group], threads)
            for group in contiguous_shards(jobs, self.n_workers)
        ]
        log.info(
            "encoding %d items in %d shards on %s",
            sum(s.size for s in shards),
            len(shards),
            self.address or f"a LocalCluster of {self.n_workers} processes",
        )
        return run_shards(shards, self.address, self.n_workers, progress)


def local_cluster(n_workers: int = 2, **kwargs: Any) -> Any:
    """A `distributed.LocalCluster` for encoding: ``n_workers`` processes of one thread each.

    One thread, because torch threads inside do the parallel work, and one shard at a time per
    process keeps one model in memory. Workers are not daemons, so they may start processes
    themselves (DataLoader workers decoding images). ``kwargs`` go to `LocalCluster`.
    """
    import dask
    from distributed import LocalCluster

    options = {"threads_per_worker": 1, "processes": True, "dashboard_address": None, **kwargs}
    with dask.config.set({"distributed.worker.daemon": False}):  # read when the workers start
        return LocalCluster(n_workers=n_workers, **options)


def task_runner(address: str | None, n_workers: int) -> Any:
    """A `prefect_dask.DaskTaskRunner` on ``address``, or on a fresh `local_cluster` for the run."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"n_workers": n_workers})


def run_shards(
    shards: Sequence[Shard], address: str | None, n_workers: int, progress: Callable[[int], None]
) -> dict[int, str]:
    """One ``encode-features`` flow run whose tasks are the shards, on a DaskTaskRunner.

    Returns the merged failures; a shard's error is re-raised (its finished parts stay).
    """
    runner = task_runner(address, n_workers)
    run_id = uuid.uuid4().hex
    _PENDING[run_id] = (list(shards), progress)
    try:
        with _shared_api():
            return encode_features.with_options(task_runner=runner)(run_id)
    finally:
        _PENDING.pop(run_id, None)


def _shared_api() -> contextlib.AbstractContextManager:
    """Without ``PREFECT_API_URL``, start Prefect's temporary server here and name it in the
    settings, which travel with every task: else each worker would start a server of its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect itself would start (stopped at exit)
    server.start()
    return temporary_settings({PREFECT_API_URL: server.api_url})


# Driver side: what each flow run works on. The flow takes only a key: Prefect stores flow
# parameters in its database and ships the flow (with what its code refers to) to every task,
# so neither the shards nor the progress bar may be a parameter or a global of the flow.
_PENDING: dict[str, tuple[list[Shard], Callable[[int], None]]] = {}


def _pending(run_id: str) -> tuple[list[Shard], Callable[[int], None]]:
    return _PENDING[run_id]


encode_shard_task = task(encode_shard, name="encode-shard", cache_policy=NO_CACHE, persist_result=False)


@flow(name="encode-features", persist_result=False)
def encode_features(run_id: str) -> dict[int, str]:
    """Submit one task per shard, watch the parts folder for progress, merge the failures."""
    shards, progress = _pending(run_id)
    futures = [encode_shard_task.submit(shard) for shard in shards]
    return _gather_with_progress(futures, shards, progress)


def _gather_with_progress(futures: list, shards: Sequence[Shard], progress: Callable[[int], None]) -> dict:
    """Wait for the shard tasks, advancing the bar as part files appear; -> merged failures."""
    counted: set[int] = set()
    jobs = [(k, job) for k, shard in enumerate(shards) for job in shard.jobs]

    def tick(finished_shards: set[int]) -> None:
        for j, (k, job) in enumerate(jobs):
            if j not in counted and (k in finished_shards or job.part.exists()):
                counted.add(j)
                progress(len(job.positions))

    pending = set(range(len(futures)))
    while pending:
        time.sleep(POLL_S)
        pending = {k for k in pending if not futures[k].wrapped_future.done()}
        tick({k for k in range(len(futures)) if k not in pending})
    failures: dict[int, str] = {}
    for future in futures:
        failures.update(future.result())  # re-raises a shard's error
    return failures
