"""The three deployments: ``refresh-features`` (on a cron from params), ``pipeline`` and ``onboard-catalog``.

Two ways to run them, both against a real Prefect server (the temporary one Prefect starts by itself
cannot schedule):

- ``cammsr serve``: this process serves all three (`serve_deployments`) and runs their flow runs;
- ``prefect deploy --all`` + ``prefect worker start --pool cammsr``: prefect.yaml, whose build step
  `params_step` reads the cron from params.yaml, so both ways take the schedule from one place.

See docs/ORCHESTRATION.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from cammsr.core.config import load_params
from cammsr.ops.stages import Project
from flows.onboard import onboard_catalog
from flows.pipeline import pipeline
from flows.refresh import refresh_features

REFRESH, PIPELINE, ONBOARD = "refresh-features", "pipeline", "onboard-catalog"


def build_deployments(project: Project, cron: str | None = None) -> list[RunnerDeployment]:
    """The deployments of this project; ``cron`` overrides ``params.orchestration.refresh_cron``."""
    schedule = cron or project.params().orchestration.refresh_cron
    where = {"root": str(project.root), "params_path": str(project.params_path)}
    module = EntrypointType.MODULE_PATH  # runs import `flows.*` (installed), whatever the working directory
    return [
        refresh_features.to_deployment(
            name=REFRESH, cron=schedule, parameters=where, entrypoint_type=module, tags=["cammsr"],
            description=f"Re-download changed sources, re-normalize, encode new/changed items, then (per "
                        f"params) recommend with the trained model ({schedule})"),
        pipeline.to_deployment(name=PIPELINE, parameters=where, entrypoint_type=module, tags=["cammsr"],
                               description="The whole DAG for some or all catalogs, consistent with dvc.lock"),
        onboard_catalog.to_deployment(name=ONBOARD, parameters=where, entrypoint_type=module, tags=["cammsr"],
                                      description="Check a new catalog's sources, add it to params.yaml, run it"),
    ]


def serve_deployments(project: Project, cron: str | None = None, limit: int | None = 1) -> None:
    """Serve the deployments from this process until interrupted (``cammsr serve``).

    ``limit`` bounds concurrent flow runs: one at a time by default, since every run shares the
    project's data folder and dvc.lock.
    """
    from prefect import serve

    serve(*build_deployments(project, cron), limit=limit)


def params_step(params_path: str = "params.yaml") -> dict[str, Any]:
    """A prefect.yaml build step: what the deployments need from params.yaml, plus the project root.

    Used as ``{{ params.refresh_cron }}`` and ``{{ params.root }}`` in prefect.yaml (step id ``params``).
    """
    path = Path(params_path).resolve()
    orchestration = load_params(path).orchestration
    return {"refresh_cron": orchestration.refresh_cron, "refresh_downstream": orchestration.refresh_downstream,
            "refresh_recommend": orchestration.refresh_recommend,
            "root": str(Path(os.getcwd()).resolve()), "params_path": str(path)}
