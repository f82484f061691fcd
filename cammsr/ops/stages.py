"""Running a registered stage (`cammsr.ops.registry`) for one catalog, directly or DVC-consistently.

`run_stage_now("split", "demo", project)` is what ``cammsr split --catalog demo`` (the DVC stage's cmd)
does. `run_stage` is what the Prefect tasks do: the same call, skipped when dvc.lock says ``split@demo``
is up to date, and recorded in dvc.lock afterwards (`cammsr.ops.dvc_sync`). No Prefect here: the flows
wrap these in tasks, tests may call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cammsr.core.config import Params, load_params
from cammsr.core.paths import CatalogPaths
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

    def paths(self, catalog: str, params: Params | None = None) -> CatalogPaths:
        params = params or self.params()
        return CatalogPaths.of(catalog, self.root / params.project.data_dir)

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


def run_stage_now(stage: str, catalog: str, project: Project, **options: Any) -> StageSummary:
    """Run one stage of one catalog as ``dvc repro``'s cmd does: no dvc.lock check, no record.

    Raises:
        KeyError: an unknown stage or catalog (the message lists the known ones).
    """
    spec = registry.spec(stage)
    params = project.params()
    return spec.run(params, stage_context(spec, catalog, project, params, options))


def run_stage(stage: str, catalog: str, project: Project, force: bool = False) -> StageOutcome:
    """Run one stage of one catalog unless dvc.lock says it is up to date; record it in dvc.lock.

    Raises:
        KeyError: an unknown stage or catalog (the message lists the known ones).
    """
    spec = registry.spec(stage)
    params = project.params()
    ctx = stage_context(spec, catalog, project, params)
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
    fetched = download_sources(cat.source_urls(), paths.raw_dir, paths.manifest,
                               policy=RetryPolicy.from_params(p.ingest), concurrency=p.ingest.concurrency,
                               root=project.root)
    counts = {"files": len(fetched), "changed": sum(f.changed for f in fetched),
              "bytes_downloaded": sum(f.bytes_transferred for f in fetched)}
    notes = [f"{f.entry.url}: {'changed' if f.changed else 'unchanged'}" for f in fetched]
    return StageSummary("fetch_sources", catalog, counts, round(time.perf_counter() - started, 3), notes)
