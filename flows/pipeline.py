"""The whole DAG as a Prefect flow: one task per stage, calling the same stage functions as the CLI.

    python -m flows.pipeline --catalog demo

The flow holds no stage logic: each task loads nothing itself and only forwards typed params
sections to the library function that `dvc repro` also runs (through the `cammsr` CLI).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from cammsr.config import load_params
from cammsr.paths import CatalogPaths
from cammsr.summary import StageSummary


@task(retries=2, retry_delay_seconds=5)
def ingest_task(name: str, params_path: str, root: str) -> StageSummary:
    from cammsr.ingest import run_ingest

    p = load_params(params_path)
    return run_ingest(name, p.catalog(name), p.ingest, CatalogPaths.of(name, p.project.data_dir), root=Path(root))


@task
def demo_source_task(params_path: str, out: str) -> str:
    from demo.generate import generate_demo

    generate_demo(Path(out), load_params(params_path).demo)
    return out


@task
def encode_text_task(name: str, params_path: str) -> StageSummary:
    from features.encode import encode_text

    p = load_params(params_path)
    return encode_text(name, p.features.text, CatalogPaths.of(name, p.project.data_dir), device=p.project.device)


@task
def encode_image_task(name: str, params_path: str) -> StageSummary:
    from features.encode import encode_image

    p = load_params(params_path)
    return encode_image(name, p.features.image, CatalogPaths.of(name, p.project.data_dir), device=p.project.device,
                        max_image_pixels=p.ingest.max_image_pixels)


@task
def split_task(name: str, params_path: str) -> StageSummary:
    from cammsr.splits import run_split

    p = load_params(params_path)
    return run_split(name, p.splits, CatalogPaths.of(name, p.project.data_dir))


@task
def train_task(name: str, params_path: str) -> StageSummary:
    from cammsr.train import run_train

    p = load_params(params_path)
    return run_train(name, p.train, p.splits, p.evaluate, p.project, CatalogPaths.of(name, p.project.data_dir))


@task
def evaluate_task(name: str, params_path: str) -> StageSummary:
    from cammsr.evaluate import run_evaluate

    p = load_params(params_path)
    return run_evaluate(name, p.splits, p.evaluate, p.project, CatalogPaths.of(name, p.project.data_dir))


@flow(name="pipeline", log_prints=True)
def pipeline(catalogs: list[str] | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    """ingest -> (text, image features in parallel) -> splits -> train -> evaluate, per catalog."""
    from cammsr.report import markdown_table

    p = load_params(params_path)
    names = catalogs or list(p.catalogs)
    results: dict[str, list[dict]] = {}
    for name in names:
        if name == "demo":
            demo_source_task(params_path, str(Path(root) / "data/sources/demo"))
        summaries = [ingest_task(name, params_path, root)]
        text = encode_text_task.submit(name, params_path)
        image = encode_image_task.submit(name, params_path)
        summaries += [text.result(), image.result()]
        summaries += [split_task(name, params_path)]
        summaries += [train_task(name, params_path)]
        summaries += [evaluate_task(name, params_path)]
        results[name] = [s.to_dict() for s in summaries]
        metrics = CatalogPaths.of(name, p.project.data_dir).metrics
        create_markdown_artifact(
            key=f"pipeline-{name}".lower().replace("_", "-"),
            markdown="\n".join([f"# {name}", "", *[f"- `{s.line()}`" for s in summaries], "",
                                markdown_table(name, metrics)]),
            description=f"cammsr pipeline summary for {name}",
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", action="append", help="catalog name (repeatable; default all)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    pipeline(catalogs=args.catalog, params_path=args.params)


if __name__ == "__main__":
    main()
