"""Submit a catalog's stages as Prefect tasks in DAG order and gather what they did.

The order and the edges come from the stage registry (`cammsr.ops.registry.upstream`: a stage waits
for the stages whose outputs it reads), so this DAG and dvc.yaml's are the same graph:

    (demo_source) -> (fetch_sources) -> ingest -> split -------------------+-> split_features -> train -> evaluate
                                              \\-> encode_text, encode_image -+                        \\-> recommend

(recommend also reads the whole feature stores and items.parquet: items added since training).

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
from cammsr.ops.registry import CATALOG_STAGES, STAGES, upstream
from cammsr.ops.stages import Project
from flows.artifacts import publish, run_markdown
from flows.tasks import fetch_sources_task, stage_task

log = logging.getLogger(__name__)


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
    shared: dict[str, PrefectFuture] = {}  # stages that are not per catalog (the demo source) run once
    runs = []
    for name in catalogs:
        source_dep = params.catalog(name).source_dep  # unknown catalogs fail here, before any task runs
        paths = project.paths(name, params)
        chain = [s for s in STAGES if s.per_catalog and s.name in stages]
        run = CatalogRun(name)
        head: list[PrefectFuture] = []  # what the first stages of the chain wait for
        for stage in (s for s in STAGES if not s.per_catalog):
            if any(stage.name in upstream(s, paths, source_dep) for s in chain):
                if stage.name not in shared:
                    shared[stage.name] = stage_task.submit(stage.name, name, root, params_path, force)
                run.futures.append((stage.name, shared[stage.name]))
                head = [shared[stage.name]]
        if fetch:
            fetched = fetch_sources_task.submit(name, root, params_path, wait_for=head)
            run.futures.append(("fetch_sources", fetched))
            head = [fetched]
        done: dict[str, PrefectFuture] = {}
        for stage in chain:
            waits = [done[u] for u in upstream(stage, paths, source_dep) if u in done] or head
            done[stage.name] = stage_task.submit(stage.name, name, root, params_path, force, wait_for=waits)
            run.futures.append((stage.name, done[stage.name]))
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
