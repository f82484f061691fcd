"""Each DAG stage as one call, DVC-consistent: the only place the flows touch stage functions.

`run_stage("split", "demo", project)` loads params, calls `cammsr.data.splits.run_split` exactly as
``cammsr split --catalog demo`` (the DVC stage's cmd) would, and records it in dvc.lock
(`cammsr.ops.dvc_sync`); when dvc.lock says ``split@demo`` is up to date the function is not called.
No Prefect here: the flows wrap these in tasks, tests may call them directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cammsr.core.config import Params, load_params
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.ops.dvc_sync import DvcSync, StageOutcome

CATALOG_STAGES = ("ingest", "encode_text", "encode_image", "split", "train", "evaluate")
FEATURE_STAGES = ("ingest", "encode_text", "encode_image")
DOWNSTREAM_STAGES = ("split", "train", "evaluate")
DEMO_SOURCE_DIR = "data/sources/demo"  # the out of dvc.yaml's demo_source stage


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


def needs_demo_source(params: Params, catalog: str) -> bool:
    """True when the catalog reads the generated demo files (dvc.yaml's ``demo_source`` stage)."""
    return params.catalog(catalog).source_dep.rstrip("/") == DEMO_SOURCE_DIR


def _demo_source(project: Project, _catalog: str) -> StageSummary:
    from demo.generate import generate_demo

    demo = generate_demo(project.root / DEMO_SOURCE_DIR, project.params().demo)
    counts = {"users": demo.n_users, "items": demo.n_items, "reviews": demo.n_reviews, "images": demo.n_images}
    return StageSummary("demo_source", "demo", counts, demo.seconds)


def _ingest(project: Project, catalog: str) -> StageSummary:
    from cammsr.ingest.stage import run_ingest

    p = project.params()
    paths = project.paths(catalog, p)
    return run_ingest(catalog, p.catalog(catalog), p.ingest, paths, root=project.root)


def _encode_text(project: Project, catalog: str) -> StageSummary:
    from features.encode import encode_text, scale_out

    p = project.params()
    return encode_text(catalog, p.features.text, project.paths(catalog, p), device=p.project.device,
                       **scale_out(p.features))


def _encode_image(project: Project, catalog: str) -> StageSummary:
    from features.encode import encode_image, scale_out

    p = project.params()
    return encode_image(catalog, p.features.image, project.paths(catalog, p), device=p.project.device,
                        max_image_pixels=p.ingest.max_image_pixels, **scale_out(p.features))


def _split(project: Project, catalog: str) -> StageSummary:
    from cammsr.data.splits import run_split

    p = project.params()
    return run_split(catalog, p.splits, project.paths(catalog, p))


def _train(project: Project, catalog: str) -> StageSummary:
    from cammsr.train.trainer import run_train

    p = project.params()
    return run_train(catalog, p.train, p.splits, p.evaluate, p.project, project.paths(catalog, p))


def _evaluate(project: Project, catalog: str) -> StageSummary:
    from cammsr.evaluate.stage import run_evaluate

    p = project.params()
    return run_evaluate(catalog, p.splits, p.evaluate, p.project, project.paths(catalog, p))


STAGE_FUNCTIONS: dict[str, Callable[[Project, str], StageSummary]] = {
    "demo_source": _demo_source,
    "ingest": _ingest,
    "encode_text": _encode_text,
    "encode_image": _encode_image,
    "split": _split,
    "train": _train,
    "evaluate": _evaluate,
}


def dvc_target(stage: str, catalog: str) -> str:
    """The DVC stage name: ``ingest@demo`` for foreach stages, ``demo_source`` for the demo generator."""
    return stage if stage == "demo_source" else f"{stage}@{catalog}"


def run_stage(stage: str, catalog: str, project: Project, force: bool = False) -> StageOutcome:
    """Run one stage of one catalog unless dvc.lock says it is up to date; record it in dvc.lock.

    Raises:
        KeyError: an unknown stage or catalog (the message lists the known ones).
    """
    if stage not in STAGE_FUNCTIONS:
        raise KeyError(f"unknown stage {stage!r} (known: {', '.join(STAGE_FUNCTIONS)})")
    params = project.params()
    params.catalog(catalog)
    paths = project.paths("demo" if stage == "demo_source" else catalog, params)
    summary_path = project.root / DEMO_SOURCE_DIR / "demo_summary.json" if stage == "demo_source" \
        else paths.summary(stage)
    return project.sync().run(dvc_target(stage, catalog), lambda: STAGE_FUNCTIONS[stage](project, catalog),
                              summary_path, force=force)


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
    urls = [cat.reviews] + ([cat.meta] if cat.meta else [])
    fetched = download_sources(urls, paths.raw_dir, paths.manifest, policy=RetryPolicy.from_params(p.ingest),
                               concurrency=p.ingest.concurrency, root=project.root)
    counts = {"files": len(fetched), "changed": sum(f.changed for f in fetched),
              "bytes_downloaded": sum(f.bytes_transferred for f in fetched)}
    notes = [f"{f.entry.url}: {'changed' if f.changed else 'unchanged'}" for f in fetched]
    return StageSummary("fetch_sources", catalog, counts, round(time.perf_counter() - started, 3), notes)
