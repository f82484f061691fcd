"""Every stage of the DAG, declared once.

A `StageSpec` says what a stage runs (its entry function), which params reach it, what it reads and
writes, and how the CLI invokes it. Everything else is built from `STAGES`:

- the `cammsr <stage>` commands run a stage through `cammsr.ops.stages.run_stage_now`;
- the Prefect DAG (`flows/dag.py`) takes its order from `STAGES` and its edges from `upstream`, which
  matches each stage's inputs against the other stages' outputs;
- ``dvc.yaml`` is rendered from it (`cammsr.ops.dvc_yaml`, ``cammsr dvc-yaml``), code deps included:
  they are the source folders of every module the entry function's module imports, found in the
  import graph (`cammsr.ops.code_deps`), so a stage can never miss a module it runs.

The ``call`` of a spec is the only place that picks params sections for a stage function; ``params``
lists what DVC tracks for it (a test checks that the two agree).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cammsr.core.config import Params
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary

DEMO_SOURCE_DIR = "data/sources/demo"  # the out of the demo_source stage; the demo catalog's source_dep
SOURCE = "source"  # in `StageSpec.deps`: the catalog's ``source_dep`` (what DVC watches to rerun ingest)


@dataclass(frozen=True)
class Out:
    """One output of a stage: a `CatalogPaths` attribute (per-catalog stages) or a project-relative path."""

    path: str
    role: Literal["out", "metric", "plot"] = "out"
    cache: bool = True
    persist: bool = False  # DVC keeps the previous version in place before a rerun (incremental stages)
    plot_x: str | None = None
    note: str = ""  # why this out is declared the way it is (a comment in dvc.yaml)


@dataclass
class StageContext:
    """What a stage run needs besides params: the catalog, its paths, the project root, CLI options."""

    catalog: str
    paths: CatalogPaths
    root: Path
    options: dict[str, Any] = field(default_factory=dict)


Call = Callable[[Callable[..., Any], Any, StageContext], StageSummary]


@dataclass(frozen=True)
class StageSpec:
    """One stage: entry function, params, data in and out, and the CLI command that runs it."""

    name: str
    entry: str  # "module:function" that does the work; its module's imports are the stage's code deps
    call: Call  # (entry function, params, context) -> summary: the params-to-arguments mapping
    params: tuple[str, ...]  # params keys DVC tracks; "{catalog}" stands for the catalog's key
    cli: str  # the command that runs it, without --catalog
    deps: tuple[str, ...] = ()  # CatalogPaths attributes (or SOURCE) the stage reads
    outs: tuple[Out, ...] = ()
    untracked: tuple[str, ...] = ()  # params read on purpose but not tracked: where it runs, not what
    per_catalog: bool = True
    group: Literal["source", "features", "model"] = "model"  # refresh runs "features"; "model" follows
    help: str = ""

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    def function(self) -> Callable[..., Any]:
        """The entry function, imported on demand (a CLI call loads only its own stage's code)."""
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)

    def target(self, catalog: str) -> str:
        """The DVC stage name: ``train@demo`` for per-catalog stages, the bare name otherwise."""
        return f"{self.name}@{catalog}" if self.per_catalog else self.name

    def run(self, params: Params, ctx: StageContext) -> StageSummary:
        return self.call(self.function(), params, ctx)


# --- how each stage's arguments come from params (the one place that says so) -----------------------


def _demo_source(fn, p, ctx: StageContext) -> StageSummary:
    demo = fn(Path(ctx.options.get("out", ctx.root / DEMO_SOURCE_DIR)), p.demo)
    counts = {"users": demo.n_users, "items": demo.n_items, "reviews": demo.n_reviews, "images": demo.n_images}
    return StageSummary("demo_source", "demo", counts, demo.seconds)


def _ingest(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, p.catalogs[ctx.catalog], p.ingest, ctx.paths, root=ctx.root)


def _scale_out(features) -> dict[str, Any]:
    """Where encoding runs (not what it computes): untracked by DVC on purpose."""
    return {"runner": features.runner, "dask_address": features.dask_address,
            "dask_workers": features.dask_workers, "chunk_size": features.chunk_size}


def _encode_text(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, p.features.text, ctx.paths, device=p.project.device, **_scale_out(p.features),
              precomputed=p.catalogs[ctx.catalog].text_features)


def _encode_image(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, p.features.image, ctx.paths, device=p.project.device,
              max_image_pixels=p.ingest.max_image_pixels, **_scale_out(p.features),
              precomputed=p.catalogs[ctx.catalog].image_features)


def split_params(p: Params, catalog: str):
    """``splits`` with the catalog's own k-core (``catalogs.NAME.min_interactions``) when it has one."""
    k = p.catalogs[catalog].min_interactions
    return p.splits if k is None else p.splits.model_copy(update={"user_core": k, "item_core": k})


def _split(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, split_params(p, ctx.catalog), ctx.paths)


def _split_features(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, ctx.paths)


def _train(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, p.train, p.splits, p.evaluate, p.project, ctx.paths, **ctx.options)


def _evaluate(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, p.splits, p.evaluate, p.project, ctx.paths)


def _recommend(fn, p, ctx: StageContext) -> StageSummary:
    return fn(ctx.catalog, p.recommend, ctx.paths, device=p.project.device, **ctx.options)


_WHERE_ENCODING_RUNS = ("project.device", "features.runner", "features.dask_address", "features.dask_workers",
                        "features.chunk_size")
_INCREMENTAL = "persist: DVC keeps it before a rerun, so only new or changed items are redone"

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "demo_source", "demo.generate:generate_demo", _demo_source, params=("demo",),
        cli=f"cammsr demo-source --out {DEMO_SOURCE_DIR}", per_catalog=False, group="source",
        outs=(Out(DEMO_SOURCE_DIR),),
        help="Generate the bundled demo catalog (Amazon 2018 format, planted signal and defects).",
    ),
    StageSpec(
        "ingest", "cammsr.ingest.stage:run_ingest", _ingest, params=("catalogs.{catalog}", "ingest"),
        cli="cammsr ingest", deps=(SOURCE,), group="features",
        outs=(Out("raw_dir", persist=True, note="conditional re-download (ETag / sha256) works under dvc repro"),
              Out("interactions"), Out("items"), Out("images_table", persist=True),
              Out("images_dir", persist=True, note="reruns reuse the images already stored"), Out("quarantine"),
              Out("precomputed_sources")),
        help="Download the catalog's raw files and images; normalize to Parquet.",
    ),
    StageSpec(
        "encode_text", "features.encode:encode_text", _encode_text, params=("features.text", "catalogs.{catalog}"),
        untracked=_WHERE_ENCODING_RUNS, cli="cammsr encode --modality text", deps=("items", "precomputed_sources"),
        group="features",
        outs=(Out("text_features", persist=True, note=_INCREMENTAL),),
        help="Encode item text (transformers) into the feature store.",
    ),
    StageSpec(
        "encode_image", "features.encode:encode_image", _encode_image,
        params=("features.image", "ingest.max_image_pixels", "catalogs.{catalog}"), untracked=_WHERE_ENCODING_RUNS,
        cli="cammsr encode --modality image", deps=("images_table", "images_dir", "precomputed_sources"),
        group="features",
        outs=(Out("image_features", persist=True, note=_INCREMENTAL),),
        help="Encode item images (open_clip) into the feature store.",
    ),
    StageSpec(
        "split", "cammsr.data.splits:run_split", _split, params=("splits", "catalogs.{catalog}"), cli="cammsr split",
        deps=("interactions", "items"), outs=(Out("splits_dir"),),
        help="k-core filter, item/category index, chronological leave-one-out.",
    ),
    StageSpec(
        "split_features", "cammsr.data.split_features:run_split_features", _split_features, params=(),
        cli="cammsr split-features", deps=("splits_dir", "text_features", "image_features"),
        outs=(Out("split_features_dir"),),
        help="Cut each feature store to the split's items (what train and evaluate read; the same bytes "
             "when a refresh only adds items, so training does not rerun).",
    ),
    StageSpec(
        "train", "cammsr.train.trainer:run_train", _train, params=("train", "splits", "evaluate", "project"),
        cli="cammsr train", deps=("splits_dir", "split_features_dir"),
        outs=(Out("models_dir"), Out("train_metrics", role="metric", cache=False),
              Out("train_plots", role="plot", cache=False, plot_x="step")),
        help="Train CAMMSR (or SASRec, train.model) with early stopping on validation NDCG@10.",
    ),
    StageSpec(
        "evaluate", "cammsr.evaluate.stage:run_evaluate", _evaluate, params=("splits", "evaluate", "project"),
        cli="cammsr evaluate", deps=("checkpoint", "splits_dir", "split_features_dir"),
        outs=(Out("metrics", role="metric", cache=False), Out("eval_dir", cache=False)),
        help="Full-ranking HR/NDCG/MRR of the best checkpoint beside most-popular.",
    ),
    StageSpec(
        "recommend", "cammsr.evaluate.recommend:run_recommend", _recommend, params=("recommend",),
        untracked=("project.device",), cli="cammsr recommend",
        deps=("checkpoint", "splits_dir", "items", "text_features", "image_features"),
        outs=(Out("recommendations"),),
        help="Top-k items of every user from the trained model, new items ranked from their content.",
    ),
)
BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}
CATALOG_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.per_catalog)
FEATURE_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.group == "features")
DOWNSTREAM_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.per_catalog and s.group == "model")


def spec(name: str) -> StageSpec:
    """The stage called ``name``; a KeyError lists the known ones."""
    if name not in BY_NAME:
        raise KeyError(f"unknown stage {name!r} (known: {', '.join(BY_NAME)})")
    return BY_NAME[name]


def tracked_params(stage: StageSpec, catalog: str) -> list[str]:
    return [p.replace("{catalog}", catalog) for p in stage.params]


def out_path(out: Out, paths: CatalogPaths) -> Path:
    """Where ``out`` lives: a `CatalogPaths` attribute, or a path relative to the project root."""
    return getattr(paths, out.path) if hasattr(paths, out.path) else Path(out.path)


def dep_paths(stage: StageSpec, paths: CatalogPaths, source_dep: str | None) -> list[Path]:
    """The data a stage reads, as paths (SOURCE becomes the catalog's ``source_dep``)."""
    out = []
    for d in stage.deps:
        if d == SOURCE:
            if source_dep is not None:
                out.append(Path(source_dep))
        else:
            out.append(getattr(paths, d))
    return out


def stage_outputs(stage: StageSpec, paths: CatalogPaths) -> list[Path]:
    """Every path a stage writes, its summary included."""
    outs = [out_path(o, paths) for o in stage.outs]
    return [*outs, paths.summary(stage.name)] if stage.per_catalog else outs


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def upstream(stage: StageSpec, paths: CatalogPaths, source_dep: str | None) -> list[str]:
    """Names of the stages whose outputs ``stage`` reads, in DAG order: the edges of the DAG."""
    inputs = dep_paths(stage, paths, source_dep)
    return [other.name for other in STAGES if other is not stage
            and any(_overlaps(i, o) for i in inputs for o in stage_outputs(other, paths))]
