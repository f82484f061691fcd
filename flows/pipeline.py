"""The whole DAG as a Prefect flow, for one catalog or all of them, consistent with dvc.lock.

    python -m flows.pipeline --catalog demo          # or: cammsr serve, then run the `pipeline` deployment

ingest -> (text, image features in parallel) -> splits -> train -> evaluate and recommend, one task per stage
calling the same stage functions as ``dvc repro`` (`cammsr.ops.stages`). A stage that dvc.lock says is up
to date is not rerun; one that runs is recorded with ``dvc commit``, so ``dvc status`` is clean
afterwards. Tasks run on the task runner named by ``params.orchestration.task_runner``.
"""

from __future__ import annotations

import argparse

from prefect import flow

from cammsr.ops.registry import CATALOG_STAGES
from cammsr.ops.stages import Project
from flows.dag import gather, submit_catalogs
from flows.runners import task_runner_for


@flow(name="catalog-stages")
def _stages(catalogs: list[str], stages: list[str], root: str, params_path: str, fetch: bool = False,
            force: bool = False, artifact: str = "pipeline") -> dict[str, list[dict]]:
    project = Project.at(root, params_path)
    return gather(submit_catalogs(catalogs, stages, project, fetch=fetch, force=force), project, artifact)


def run_on_configured_runner(catalogs: list[str] | None, stages: list[str], project: Project, *,
                             fetch: bool = False, force: bool = False, artifact: str = "pipeline"
                             ) -> dict[str, list[dict]]:
    """Run ``stages`` of ``catalogs`` (default all) as a subflow on the params' task runner."""
    params = project.params()
    names = list(catalogs or params.catalogs)
    for name in names:
        params.catalog(name)
    runner = task_runner_for(params.orchestration)
    return _stages.with_options(task_runner=runner)(names, list(stages), str(project.root),
                                                    str(project.params_path), fetch, force, artifact)


@flow(name="pipeline", log_prints=True)
def pipeline(catalogs: list[str] | None = None, params_path: str = "params.yaml", root: str = ".",
             force: bool = False) -> dict[str, list[dict]]:
    """ingest -> (text, image features in parallel) -> splits -> train -> evaluate and recommend, per catalog.

    Args:
        catalogs: names from params.yaml; default all.
        params_path: the params file (relative to ``root``); only ``root/params.yaml`` keeps dvc.lock in step.
        root: the project root (holds dvc.yaml).
        force: rerun every stage even when dvc.lock says it is up to date (recorded all the same).

    Returns:
        ``{catalog: [one dict per stage: summary + target + skipped]}``.
    """
    return run_on_configured_runner(catalogs, list(CATALOG_STAGES), Project.at(root, params_path), force=force)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", action="append", help="catalog name (repeatable; default all)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--force", action="store_true", help="rerun stages that dvc.lock says are up to date")
    args = ap.parse_args()
    pipeline(catalogs=args.catalog, params_path=args.params, root=args.root, force=args.force)


if __name__ == "__main__":
    main()
