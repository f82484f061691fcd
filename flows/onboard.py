"""Onboard a catalog as a Prefect flow: check the sources, add it to params.yaml, run its pipeline.

    cammsr onboard NAME --reviews URL --meta URL [--images yes|no|auto] [--image-features URL
        --feature-index URL] [--dry-run]

A bad source fails the first task with a message naming the URL, before params.yaml is touched.
The pipeline then runs for the new catalog only, through the same DVC-consistent stages as the
``pipeline`` flow, and the run's artifact shows the source report, the modalities the model used
and its metrics beside most-popular.
"""

from __future__ import annotations

import json

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cammsr.core.config import PrecomputedFeatures
from cammsr.evaluate.report import markdown_table
from cammsr.ops.onboard import OnboardPlan, apply_plan, discard_plan, plan_onboarding
from cammsr.ops.registry import CATALOG_STAGES
from cammsr.ops.stages import Project
from flows.artifacts import publish
from flows.pipeline import run_on_configured_runner
from flows.tasks import retry_on_transient


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_on_transient, cache_policy=NO_CACHE,
      task_run_name="check_source[{name}]")
def check_task(name: str, reviews: str, meta: str | None, images: str, root: str, params_path: str,
               features: dict[str, dict] | None = None, min_interactions: int | None = None) -> OnboardPlan:
    """Fetch and check the sources; compute the params.yaml edit (nothing in the project changes)."""
    project = Project.at(root, params_path)
    sources = {m: PrecomputedFeatures.model_validate(f) for m, f in (features or {}).items()}
    plan = plan_onboarding(name, reviews, meta, images, root=project.root, params_path=project.params_path,
                           features=sources, min_interactions=min_interactions)
    logger = get_run_logger()
    for line in plan.lines():
        logger.info(line)
    return plan


@task(cache_policy=NO_CACHE, task_run_name="add_to_params[{plan.name}]")
def apply_task(plan: OnboardPlan, root: str, params_path: str) -> str:
    """Move the fetched files into the catalog's raw/ and append the catalog to params.yaml."""
    project = Project.at(root, params_path)
    paths = apply_plan(plan, project.root / project.params().project.data_dir)
    return str(paths.root)


def modalities_used(stages: list[dict]) -> str:
    """The train stage's ``modalities`` count (e.g. ``id,text``), or ``?`` when train did not report it."""
    train = next((s for s in stages if s["stage"] == "train"), None)
    return str(train["counts"].get("modalities", "?")) if train else "?"


@flow(name="onboard-catalog", log_prints=True)
def onboard_catalog(name: str, reviews: str, meta: str | None = None, images: str = "auto",
                    dry_run: bool = False, params_path: str = "params.yaml", root: str = ".",
                    features: dict[str, dict] | None = None, min_interactions: int | None = None) -> dict:
    """Check ``reviews``/``meta``, add catalog ``name`` to params.yaml, run the pipeline for it only.

    Args:
        name: the new catalog's key (letters, digits, ``-``, ``_``).
        reviews, meta: http(s):// or file: URLs (plain or gzip; Amazon 2014/2018/2023, auto-detected).
        images: ``yes``, ``no`` or ``auto`` (= yes when the metadata has image URLs).
        dry_run: stop after the check; return the report and the params.yaml diff.
        features: precomputed features by modality, e.g. ``{"image": {"file": URL, "index": URL,
            "format": "auto", "provenance": "..."}}`` (imported instead of encoded).
        min_interactions: the catalog's own k-core (``catalogs.NAME.min_interactions``).

    Returns:
        ``{"catalog", "entry", "report": [lines], "diff", "stages": [...], "modalities", "metrics"}``.
    """
    project = Project.at(root, params_path)
    plan = check_task(name, reviews, meta, images, str(project.root), str(project.params_path), features,
                      min_interactions)
    result: dict = {"catalog": name, "entry": plan.entry, "report": plan.lines(), "diff": plan.diff()}
    report_md = ["## Source check", "", "```", *plan.lines(), "```", "", "## params.yaml", "", "```diff",
                 plan.diff(), "```"]
    if dry_run:
        discard_plan(plan)
        publish(f"onboard-{name}", "\n".join([f"# onboard (dry run): {name}", "", *report_md]),
                f"cammsr onboard dry run for {name}")
        return result
    apply_task(plan, str(project.root), str(project.params_path))
    stages = run_on_configured_runner([name], list(CATALOG_STAGES), project, artifact="onboard")[name]
    metrics = project.paths(name).metrics
    result.update(stages=stages, modalities=modalities_used(stages), metrics=str(metrics))
    logger = get_run_logger()
    logger.info("%s onboarded; model modalities: %s; metrics: %s", name, result["modalities"], metrics)
    if metrics.is_file():
        logger.info("test metrics: %s", json.dumps(json.loads(metrics.read_text())["model"]["test"]))
    lines = [f"# onboard: {name}", "", f"**modalities used by the model:** {result['modalities']}", "",
             *report_md]
    if metrics.is_file():
        lines += ["", "## Test metrics (full ranking)", "", markdown_table(name, metrics)]
    publish(f"onboard-{name}-summary", "\n".join(lines), f"cammsr onboarding of {name}")
    return result
