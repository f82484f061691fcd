"""Running a registered stage (`cammsr.ops.registry`) for one catalog, directly or DVC-consistently.

`run_stage_now("split", "demo", project)` is what ``cammsr split --catalog demo`` (the DVC stage's cmd)
does. `run_stage` is what the Prefect tasks do: the same call, skipped when dvc.lock says ``split@demo``
is up to date, and recorded in dvc.lock afterwards (`cammsr.ops.dvc_sync`). No Prefect here: the flows
wrap these in tasks, tests may call them directly.

Every run of a registered stage goes through `guarded`, so every stage, present and future, gets:

- its outputs checked to stay under the data root (a catalog name can never write beside the project);
- the lock on its outputs (`cammsr.core.locks`): a second run of the same stage and catalog waits, or
  stops at once with ``wait=False`` (``--no-wait``);
- its own temp folder, ``data/NAME/.tmp/<stage>/``, cleared first: temp files of a killed run go there
  and the next run removes them (`cammsr.core.atomic.stage_temp_dir`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cammsr.core.atomic import stage_temp_dir
from cammsr.core.config import Params, load_params
from cammsr.core.locks import lock_path, output_lock
from cammsr.core.paths import CatalogPaths, check_inside
from cammsr.core.summary import StageSummary
from cammsr.ops import registry
from cammsr.ops.dvc_sync import DvcSync, StageOutcome
from cammsr.ops.registry import DEMO_SOURCE_DIR, StageContext, StageSpec


@dataclass(frozen=True)
class Project:
    """Where a run happens: the project root and its params file (absolute, so any cwd works)."""

    root: Path
    params_path: Path

    @classmethod
    def at(cls, root: str | Path = ".", params_path: str | Path = "params.yaml") -> Project:
        """``params_path`` relative to ``root`` unless absolute."""
        root = Path(root).resolve()
        params = Path(params_path)
        return cls(root, (params if params.is_absolute() else root / params).resolve())

    def params(self) -> Params:
        return load_params(self.params_path)

    def data_root(self, params: Params | None = None) -> Path:
        return self.root / (params or self.params()).project.data_dir

    def paths(self, catalog: str, params: Params | None = None) -> CatalogPaths:
        params = params or self.params()
        return CatalogPaths.of(catalog, self.data_root(params))

    def sync(self) -> DvcSync:
        return DvcSync.for_project(self.root, self.params_path)


def stage_context(stage: StageSpec, catalog: str, project: Project, params: Params,
                  options: dict[str, Any] | None = None) -> StageContext:
    """The context a stage runs in; an unknown catalog is an error naming the known ones."""
    if stage.per_catalog:
        params.catalog(catalog)
    return StageContext(catalog, project.paths(catalog, params), project.root, dict(options or {}))


def summary_path(stage: StageSpec, ctx: StageContext) -> Path:
    """Where the stage leaves its summary: ``summaries/<stage>.json``, or the demo generator's own file."""
    return ctx.paths.summary(stage.name) if stage.per_catalog else ctx.root / DEMO_SOURCE_DIR / "demo_summary.json"


@contextlib.contextmanager
def guarded(spec: StageSpec, ctx: StageContext, project: Project, params: Params, *, wait: bool = True
            ) -> Iterator[None]:
    """Around one run of a stage: outputs checked under the data root, their lock held, the temp folder set.

    In a distributed job (torchrun: ``RANK`` set) rank 0 holds the lock and the temp folder for the whole
    job: the other ranks write no outputs, and waiting on rank 0's lock would deadlock its rendezvous.

    Raises:
        UnsafePathError: an output would land outside the data root.
        LockBusy: ``wait`` is False and another run holds the lock.
    """
    data_root = project.data_root(params)
    if spec.per_catalog:  # the others write fixed project paths declared in the registry
        for out in registry.stage_outputs(spec, ctx.paths):
            check_inside(out if out.is_absolute() else project.root / out, data_root, f"{spec.name} output")
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    target = spec.target(ctx.catalog)
    what = f"{spec.name} of catalog {ctx.catalog}" if spec.per_catalog else spec.name
    temp = ctx.paths.tmp_dir(spec.name) if spec.per_catalog else data_root / ".tmp" / spec.name
    with output_lock(lock_path(data_root, target), what, wait=wait), stage_temp_dir(temp):
        yield


def run_stage_now(stage: str, catalog: str, project: Project, *, wait: bool = True, **options: Any) -> StageSummary:
    """Run one stage of one catalog as ``dvc repro``'s cmd does: no dvc.lock check, no record.

    ``wait``: when another run of the same stage and catalog is going, wait for it (else `LockBusy`).

    Raises:
        KeyError: an unknown stage or catalog (the message lists the known ones).
    """
    spec = registry.spec(stage)
    params = project.params()
    ctx = stage_context(spec, catalog, project, params, options)
    with guarded(spec, ctx, project, params, wait=wait):
        return spec.run(params, ctx)


def run_stage(stage: str, catalog: str, project: Project, force: bool = False) -> StageOutcome:
    """Run one stage of one catalog unless dvc.lock says it is up to date; record it in dvc.lock.

    Raises:
        KeyError: an unknown stage or catalog (the message lists the known ones).
    """
    spec = registry.spec(stage)
    params = project.params()
    ctx = stage_context(spec, catalog, project, params)
    with guarded(spec, ctx, project, params):  # around the dvc.lock check too: a waiter then finds it done
        return project.sync().run(spec.target(catalog), lambda: spec.run(params, ctx), summary_path(spec, ctx),
                                  force=force)


def fetch_sources(catalog: str, project: Project) -> StageSummary:
    """Conditionally re-download a catalog's reviews/meta into ``raw/`` (what ingest's first step does).

    A changed file changes ``raw/``, an out of ``ingest@catalog``, so DVC then sees ingest as stale
    and it reruns; an unchanged one (ETag/Last-Modified 304, same size+mtime or sha256) costs nothing
    and leaves ``raw/`` byte-identical. This catches changes that DVC's ``source_dep`` cannot see
    (e.g. a new metadata file at an http URL whose reviews file did not change).
    """
    import time

    from cammsr.ingest.download import RetryPolicy, download_sources

    started = time.perf_counter()
    p = project.params()
    cat = p.catalog(catalog)
    paths = project.paths(catalog, p)
    ingest = registry.spec("ingest")
    with output_lock(lock_path(project.data_root(p), ingest.target(catalog)), f"ingest of catalog {catalog}"):
        fetched = download_sources(cat.source_urls(), paths.raw_dir, paths.manifest,
                                   policy=RetryPolicy.from_params(p.ingest), concurrency=p.ingest.concurrency,
                                   root=project.root)
    counts = {"files": len(fetched), "changed": sum(f.changed for f in fetched),
              "bytes_downloaded": sum(f.bytes_transferred for f in fetched)}
    notes = [f"{f.entry.url}: {'changed' if f.changed else 'unchanged'}" for f in fetched]
    return StageSummary("fetch_sources", catalog, counts, round(time.perf_counter() - started, 3), notes)
