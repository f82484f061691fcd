"""Submit a catalog's stages as Prefect tasks in DAG order and gather what they did.

    (demo_source) -> (fetch_sources) -> ingest -> encode_text  -+-> split -> train -> evaluate
                                              \\-> encode_image -+

Catalogs are independent: their chains are all submitted at once and run side by side on the task
runner; a failed stage stops only its own catalog's later stages. Shared by the ``pipeline`` and
``refresh-features`` flows; holds no stage logic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from prefect.futures import PrefectFuture, wait

from cammsr.core.summary import StageSummary
from cammsr.ops.dvc_sync import StageOutcome
from cammsr.ops.stages import CATALOG_STAGES, Project, needs_demo_source
from flows.artifacts import publish, run_markdown
from flows.tasks import fetch_sources_task, stage_task

log = logging.getLogger(__name__)

UPSTREAM = {  # the order: features in parallel, then splits
    "ingest": (),
    "encode_text": ("ingest",),
    "encode_image": ("ingest",),
    "split": ("encode_text", "encode_image", "ingest"),
    "train": ("split",),
    "evaluate": ("train",),
}


class StagesFailed(RuntimeError):
    """At least one stage failed; the message lists each failed stage and its error."""


@dataclass
class CatalogRun:
    """The futures of one catalog's stages, in submission order."""

    name: str
    futures: list[tuple[str, PrefectFuture]] = field(default_factory=list)


def submit_catalogs(catalogs: Sequence[str], stages: Sequence[str], project: Project, *,
                    fetch: bool = False, force: bool = False) -> list[CatalogRun]:
    """Submit every catalog's chain of ``stages`` (a subset of `CATALOG_STAGES`, in DAG order).

    ``fetch`` adds a conditional re-download before ingest; ``force`` reruns stages that dvc.lock
    says are up to date (they are recorded all the same).
    """
    unknown = [s for s in stages if s not in CATALOG_STAGES]
    if unknown:
        raise KeyError(f"unknown stage(s) {unknown} (known: {', '.join(CATALOG_STAGES)})")
    params = project.params()
    root, params_path = str(project.root), str(project.params_path)
    demo_source: PrefectFuture | None = None
    runs = []
    for name in catalogs:
        params.catalog(name)  # unknown catalogs fail here, before any task runs
        run = CatalogRun(name)
        head: list[PrefectFuture] = []
        if needs_demo_source(params, name):
            if demo_source is None:
                demo_source = stage_task.submit("demo_source", name, root, params_path, force)
            run.futures.append(("demo_source", demo_source))
            head = [demo_source]
        if fetch:
            fetched = fetch_sources_task.submit(name, root, params_path, wait_for=head)
            run.futures.append(("fetch_sources", fetched))
            head = [fetched]
        done: dict[str, PrefectFuture] = {}
        for stage in (s for s in CATALOG_STAGES if s in stages):
            upstream = [done[u] for u in UPSTREAM[stage] if u in done] or head
            done[stage] = stage_task.submit(stage, name, root, params_path, force, wait_for=upstream)
            run.futures.append((stage, done[stage]))
        runs.append(run)
    return runs


def gather(runs: Sequence[CatalogRun], project: Project, flow_name: str) -> dict[str, list[dict]]:
    """Wait for every stage, publish one artifact per catalog, return ``{catalog: [stage dicts]}``.

    Raises:
        StagesFailed: after the artifacts are published, when any stage failed or never ran.
    """
    wait([f for run in runs for _, f in run.futures])
    params = project.params()
    results: dict[str, list[dict]] = {}
    failures: list[str] = []
    for run in runs:
        outcomes: list[StageOutcome | StageSummary] = []
        for stage, future in run.futures:
            state = future.state
            if state.is_completed():
                outcomes.append(future.result())
            else:
                failures.append(f"{stage}[{run.name}]: {state.name}: {state.message or ''}".rstrip(": "))
        results[run.name] = [o.to_dict() for o in outcomes]
        ran_evaluate = any(stage == "evaluate" for stage, _ in run.futures)
        metrics = project.paths(run.name, params).metrics if ran_evaluate else None
        publish(f"{flow_name}-{run.name}", run_markdown(f"{flow_name}: {run.name}", outcomes, metrics),
                f"cammsr {flow_name} run for catalog {run.name}")
    if failures:
        raise StagesFailed("stages that did not complete:\n  " + "\n  ".join(failures))
    return results
