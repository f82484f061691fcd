"""`cammsr`: the one entry point for DVC stages, Prefect tasks and people.

Each command loads params.yaml once, picks the sections its stage needs and calls the stage
function; no stage logic lives here.

Every failure ends with one line on stderr naming the file (line, item) and the reason, and exit code 2
when the input is wrong or 1 when the run could not finish (`cammsr.core.errors`); ``--verbose`` also
prints the traceback.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from typer.core import TyperGroup

from cammsr.core.config import load_params
from cammsr.core.errors import describe
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary


class _Cammsr(TyperGroup):
    """The command group: an exception out of any command becomes one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, typer.Exit, typer.Abort):
            raise  # exits a command chose itself, and usage errors: click reports them
        except Exception as exc:
            code, line = describe(exc)
            if ctx.params.get("verbose"):
                traceback.print_exception(exc, file=sys.stderr)
            typer.secho(f"error: {line}", fg="red", err=True)
            raise typer.Exit(code) from exc


app = typer.Typer(cls=_Cammsr, add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
CatalogOpt = Annotated[str, typer.Option("--catalog", "-c", help="catalog name from params.yaml")]
NoWaitOpt = Annotated[bool, typer.Option("--no-wait", help="when another run of this stage and catalog is "
                                         "going, stop at once (exit 1) instead of waiting for it")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs; tracebacks on errors")]
           = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)], force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(params_path: Path):
    return load_params(params_path)  # ParamsError: one line naming the file and key, exit 2


def _paths(params, catalog: str) -> CatalogPaths:
    params.catalog(catalog)  # KeyError listing the known catalogs: one line, exit 2
    return CatalogPaths.of(catalog, params.project.data_dir)


def _run(stage: str, catalog: str, params_path: Path, no_wait: bool = False, **options) -> StageSummary:
    """Run a registered stage for one catalog (what dvc.yaml's cmd of that stage does)."""
    from cammsr.ops.stages import Project, run_stage_now

    project = Project.at(Path.cwd(), params_path)
    _paths(_load(params_path), catalog)  # a bad params file or an unknown catalog: one line, exit 2
    return run_stage_now(stage, catalog, project, wait=not no_wait, **options)


@app.command()
def ingest(catalog: CatalogOpt, params_path: ParamsOpt = Path("params.yaml"), no_wait: NoWaitOpt = False) -> None:
    """Download the catalog's raw files and images; normalize to Parquet."""
    _run("ingest", catalog, params_path, no_wait)  # the stage logs its own summary line


@app.command()
def encode(catalog: CatalogOpt, modality: Annotated[str, typer.Option(help="text or image")],
           params_path: ParamsOpt = Path("params.yaml"), no_wait: NoWaitOpt = False) -> None:
    """Encode item text (transformers) or images (open_clip) into the feature store."""
    if modality not in ("text", "image"):
        raise typer.BadParameter(f"--modality must be text or image, not {modality!r}")
    _run(f"encode_{modality}", catalog, params_path, no_wait)


@app.command()
def split(catalog: CatalogOpt, params_path: ParamsOpt = Path("params.yaml"), no_wait: NoWaitOpt = False) -> None:
    """k-core filter, item/category index, chronological leave-one-out."""
    console.print(_run("split", catalog, params_path, no_wait).line())


@app.command("split-features")
def split_features(catalog: CatalogOpt, params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Cut each feature store to the split's items (what train and evaluate read)."""
    console.print(_run("split_features", catalog, params_path).line())


@app.command()
def train(catalog: CatalogOpt, params_path: ParamsOpt = Path("params.yaml"),
          resume: Annotated[bool, typer.Option(help="continue from models/last.pt")] = False,
          deterministic: Annotated[bool, typer.Option(help="torch deterministic algorithms")] = False,
          no_wait: NoWaitOpt = False) -> None:
    """Train CAMMSR (or SASRec, train.model) with early stopping on validation NDCG@10."""
    _run("train", catalog, params_path, no_wait, resume=resume, deterministic=deterministic)


@app.command()
def evaluate(catalog: CatalogOpt, params_path: ParamsOpt = Path("params.yaml"), no_wait: NoWaitOpt = False) -> None:
    """Full-ranking HR/NDCG/MRR of the best checkpoint beside most-popular."""
    from cammsr.evaluate.report import metrics_table

    console.print(_run("evaluate", catalog, params_path, no_wait).line())
    console.print(metrics_table(catalog, _paths(_load(params_path), catalog).metrics))


@app.command()
def recommend(
    catalog: CatalogOpt,
    k: Annotated[int | None, typer.Option("--k", help="items per user (default recommend.k)")] = None,
    users: Annotated[Path | None, typer.Option(help="only these users: a text file, one id per line, or a "
                                              "Parquet/CSV file with a user_id column")] = None,
    out: Annotated[Path | None, typer.Option(help="output Parquet (default data/NAME/recommendations.parquet)")]
    = None,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Top-k items of every user from the trained model, new items ranked from their content."""
    options = {key: value for key, value in (("k", k), ("users", users), ("out", out)) if value is not None}
    try:
        summary = _run("recommend", catalog, params_path, **options)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]recommend[{catalog}]: {exc}")
        raise typer.Exit(2) from exc
    console.print(summary.line(), markup=False)


@app.command()
def experiments(
    catalog: CatalogOpt,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
    variant: Annotated[list[str] | None, typer.Option("--variant", help="variant name (repeatable; default all)")]
    = None,
    out: Annotated[Path | None, typer.Option(help="markdown report (default reports/NAME-experiments.md)")] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs for every run")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a train param for every run, "
                                                   "e.g. --set lr=0.002 (repeatable)")] = None,
    cold_items: Annotated[float | None, typer.Option(
        "--cold-items", help="instead: the cold-item study, holding this fraction of the items out of training "
                             "(default variants CAMMSR and SASRec; report reports/NAME-cold-items.md)")] = None,
    cold_seed: Annotated[int, typer.Option(help="seed of the cold-item draw (the same items for every run)")] = 0,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Run the paper's study (CAMMSR, SASRec, ablations, category noise) over seeds; write a markdown table.

    With --cold-items: hold a fraction of the items out of training and report HR/NDCG@10 on the test
    targets that are cold items (CAMMSR ranks them from their content) beside SASRec and most-popular."""
    from cammsr.train.experiments import VARIANTS, run_experiments, train_overrides

    p = _load(params_path)
    paths = _paths(p, catalog)
    if not (paths.splits_dir / "sequences.parquet").exists() or not paths.split_features_dir.exists():
        console.print(f"[red]{paths.splits_dir} or {paths.split_features_dir} is missing: "
                      f"run `dvc repro train@{catalog}` first")
        raise typer.Exit(2)
    seed_list = [int(s) for s in seeds.split(",")]
    overrides = train_overrides(set_ or [], p.train)
    if epochs:
        overrides["epochs"] = epochs
    if cold_items is not None:
        from cammsr.train.cold import DEFAULT_VARIANTS, run_cold_items

        try:
            text = run_cold_items(catalog, p, paths, seed_list, variant or DEFAULT_VARIANTS, cold_items, cold_seed,
                                  out or Path("reports") / f"{catalog}-cold-items.md", overrides=overrides or None)
        except ValueError as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(2) from exc
    else:
        text = run_experiments(catalog, p, paths, seed_list, variant or list(VARIANTS),
                               out or Path("reports") / f"{catalog}-experiments.md", overrides=overrides or None)
    console.print(text, markup=False)


@app.command("export-recbole")
def export_recbole(catalog: CatalogOpt,
                   out: Annotated[Path | None, typer.Option(help="RecBole data_path (default data/NAME/recbole)")]
                   = None,
                   params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Write the catalog's split as RecBole atomic files (same users, items, order and leave-one-out targets)."""
    from cammsr.data.export_recbole import run_export_recbole

    p = _load(params_path)
    try:
        s = run_export_recbole(catalog, _paths(p, catalog), out)
    except FileNotFoundError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    console.print(s.line())


@app.command()
def report(catalog: Annotated[list[str] | None, typer.Option("--catalog", "-c")] = None,
           params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Print the metrics table of each catalog (default: all catalogs with metrics)."""
    from cammsr.evaluate.report import metrics_table

    p = _load(params_path)
    names = catalog or list(p.catalogs)
    shown = 0
    for name in names:
        path = _paths(p, name).metrics
        if path.exists():
            console.print(metrics_table(name, path))
            shown += 1
        else:
            console.print(f"[yellow]{name}: no metrics yet ({path}); run `dvc repro evaluate@{name}`")
    if p.features.image.pretrained is None:
        console.print("[yellow]Note: image features come from a RANDOM-weight CLIP "
                      f"({p.features.image.model}, pretrained: null) - set features.image.pretrained for real runs.")
    if not shown:
        raise typer.Exit(1)


@app.command("demo-source")
def demo_source(out: Annotated[Path, typer.Option(help="output folder")] = Path("data/sources/demo"),
                params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Generate the bundled demo catalog (Amazon 2018 format, planted signal and defects)."""
    from cammsr.ops.stages import Project, run_stage_now

    _load(params_path)
    run_stage_now("demo_source", "demo", Project.at(Path.cwd(), params_path), out=out)


@app.command("dvc-yaml")
def dvc_yaml(check: Annotated[bool, typer.Option("--check", help="only compare; exit 1 when it differs")] = False,
             path: Annotated[Path, typer.Option(help="the dvc.yaml to write or check")] = Path("dvc.yaml")) -> None:
    """Write dvc.yaml from the stage registry (or, with --check, show how the file differs from it)."""
    from cammsr.ops import dvc_yaml as render

    if check:
        diff = render.check(path)
        if diff:
            typer.echo("\n".join(diff))
            console.print(f"[red]{path} is not what the stage registry renders: run `cammsr dvc-yaml`")
            raise typer.Exit(1)
        console.print(f"{path} matches the stage registry")
        return
    console.print(f"{path} {'written' if render.write(path) else 'unchanged'} (from the stage registry)")


@app.command()
def demo(params_path: ParamsOpt = Path("params.yaml")) -> None:
    """Run the whole DAG on the demo catalog with `dvc repro` (through evaluate and recommend), then print
    its metrics table, the recommend summary and three example users."""
    import json

    from cammsr.evaluate.report import example_users, examples_table

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # the DVC stages call `cammsr`: make sure it is this interpreter's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    rc = subprocess.call([sys.executable, "-m", "dvc", "repro", "evaluate@demo", "recommend@demo"], env=env)
    if rc:
        raise typer.Exit(rc)
    report(catalog=["demo"], params_path=params_path)
    paths = _paths(_load(params_path), "demo")
    raw = json.loads(paths.summary("recommend").read_text())  # its keys come back sorted: users first again
    counts = {k: raw["counts"][k] for k in ("users", "users_per_s", "peak_rss_mb") if k in raw["counts"]}
    counts |= {k: v for k, v in raw["counts"].items() if k not in counts}
    console.print(StageSummary(raw["stage"], raw["catalog"], counts, raw["seconds"]).line(), markup=False)
    for note in raw.get("notes", []):
        console.print(f"  {note}", markup=False)
    console.print(examples_table("demo", example_users(paths)))


# --- orchestration commands ---


@app.command()
def onboard(
    name: Annotated[str, typer.Argument(help="the new catalog's key in params.yaml")],
    reviews: Annotated[str | None, typer.Option(help="reviews file: http(s):// or file: URL (plain or .gz)")]
    = None,
    meta: Annotated[str | None, typer.Option(help="item metadata file URL")] = None,
    images: Annotated[str, typer.Option(help="yes, no, or auto (= yes when the metadata has image URLs)")] = "auto",
    text_features: Annotated[str | None, typer.Option(help="precomputed text features (URL) to import instead "
                                                      "of encoding the item text")] = None,
    image_features: Annotated[str | None, typer.Option(help="precomputed image features (URL) to import "
                                                       "instead of encoding images")] = None,
    feature_index: Annotated[str | None, typer.Option(help="the features' item index (URL): row -> item id")]
    = None,
    feature_format: Annotated[str, typer.Option(help="auto, unisrec, mmrec, npy or parquet")] = "auto",
    feature_provenance: Annotated[str, typer.Option(help="what made the features, e.g. 'CLIP ViT-B/32'")] = "",
    min_interactions: Annotated[int | None, typer.Option(
        help="this catalog's k-core: users and items need at least this many interactions (default "
             "splits.user_core / item_core); the source check says which value works for a small catalog")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check the sources, print the params diff, change nothing")]
    = False,
    undo: Annotated[bool, typer.Option("--undo", help="take out catalog NAME that onboarding added: its params.yaml "
                                       "lines, data/NAME and its dvc.lock entries")] = False,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Check a new catalog's sources, add it to params.yaml, run its pipeline (Prefect flow onboard-catalog)."""
    from cammsr.evaluate.report import metrics_table
    from cammsr.ops.onboard import discard_plan, plan_onboarding, precomputed_sources, undo_onboarding
    from cammsr.ops.params_edit import ParamsEditError
    from cammsr.ops.source_check import SourceError
    from flows.dag import StagesFailed

    if undo:
        for line in undo_onboarding(name, root=Path.cwd(), params_path=params_path):
            typer.echo(line)
        typer.echo(f"{name}: onboarding undone")
        return
    if reviews is None:
        raise typer.BadParameter("--reviews is required (or --undo to take an onboarded catalog out)")
    try:
        features = precomputed_sources(text_features, image_features, feature_index, feature_format,
                                       feature_provenance)
        if dry_run:
            plan = plan_onboarding(name, reviews, meta, images, root=Path.cwd(), params_path=params_path,
                                   features=features, min_interactions=min_interactions)
            discard_plan(plan)
            typer.echo("\n".join(plan.lines()))
            typer.echo(f"\ndry run: {params_path} would change as follows (nothing written):")
            typer.echo(plan.diff())
            typer.echo(f"then: the pipeline for {name} only (ingest -> ... -> evaluate), recorded in dvc.lock")
            return
        from flows.onboard import onboard_catalog

        result = onboard_catalog(name=name, reviews=reviews, meta=meta, images=images, params_path=str(params_path),
                                 root=str(Path.cwd()), features={m: f.model_dump() for m, f in features.items()},
                                 min_interactions=min_interactions)
    except (SourceError, ParamsEditError, ValueError) as exc:
        typer.secho(f"error: onboarding {name} failed, {params_path} is unchanged: {describe(exc)[1]}",
                    fg="red", err=True)
        raise typer.Exit(2) from exc
    except StagesFailed as exc:
        reason = " ".join(str(exc).split())
        typer.secho(f"error: {name} was added to {params_path}, but its pipeline stopped: {reason}", fg="red",
                    err=True)
        typer.secho(f"  to finish: fix the cause, then `dvc repro evaluate@{name}`\n"
                    f"  to undo:   `cammsr onboard --undo {name}` (removes its params.yaml lines, data/{name} "
                    f"and its dvc.lock entries)", err=True)
        raise typer.Exit(1) from exc
    typer.echo("\n".join(result["report"]))
    console.print(f"[bold]{name}[/]: added to {params_path}; model modalities: {result['modalities']}")
    console.print(metrics_table(name, Path(result["metrics"])))


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option(help="override orchestration.refresh_cron, e.g. '* * * * *'")] = None,
    limit: Annotated[int, typer.Option(help="flow runs at once (they share data/ and dvc.lock)")] = 1,
    params_path: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serve the refresh-features (cron), pipeline and onboard-catalog deployments from this process."""
    from prefect.settings import PREFECT_API_URL

    from cammsr.ops.stages import Project
    from flows.deployments import serve_deployments

    _load(params_path)  # a broken params file is an error before anything is served
    if not PREFECT_API_URL.value():
        console.print("[red]PREFECT_API_URL is not set: schedules need a Prefect server. Start one with "
                      "`prefect server start` and run `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`")
        raise typer.Exit(2)
    serve_deployments(Project.at(Path.cwd(), params_path), cron=cron, limit=limit)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
