"""Prefect tasks over `cammsr.ops.stages`: retries on transient errors, no Prefect caching (dvc.lock is the cache).

A task is retried only when the error is one that waiting can fix (a dropped connection, a
timeout, DVC's repo lock held by a concurrent ``dvc`` command); a 404, a wrong file format or a bug
fails at once with its message.
"""

from __future__ import annotations

import logging

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cammsr.core.summary import StageSummary
from cammsr.ingest.download import DownloadError, NotFoundError, TransientError
from cammsr.ops.dvc_sync import StageOutcome
from cammsr.ops.stages import Project, fetch_sources, run_stage

log = logging.getLogger(__name__)

RETRIES = 2
RETRY_DELAYS_S = [10, 60]


def is_transient(exc: BaseException | None) -> bool:
    """True for failures worth another attempt, looking through ``raise ... from`` chains."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, NotFoundError):
            return False
        if isinstance(exc, TransientError | httpx.TransportError | TimeoutError | ConnectionError):
            return True
        if type(exc).__name__ == "LockError" and type(exc).__module__.startswith("dvc"):
            return True  # another dvc process holds the repo lock
        if isinstance(exc, DownloadError) and exc.__cause__ is None:
            return False  # a 4xx or a bad URL: retrying gives the same answer
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def retry_on_transient(_task, _task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure `is_transient`."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by the failed state
        retry = is_transient(exc)
        log.info("%s: %s", "transient failure, retrying" if retry else "not transient, no retry", exc)
        return retry
    return False


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_on_transient,
      cache_policy=NO_CACHE, task_run_name="{stage}[{catalog}]")
def stage_task(stage: str, catalog: str, root: str, params_path: str, force: bool = False) -> StageOutcome:
    """One DAG stage of one catalog (skipped when dvc.lock says it is up to date)."""
    outcome = run_stage(stage, catalog, Project.at(root, params_path), force=force)
    get_run_logger().info(outcome.line())
    return outcome


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_on_transient,
      cache_policy=NO_CACHE, task_run_name="fetch_sources[{catalog}]")
def fetch_sources_task(catalog: str, root: str, params_path: str) -> StageSummary:
    """Conditional re-download of a catalog's source files (see `cammsr.ops.stages.fetch_sources`)."""
    summary = fetch_sources(catalog, Project.at(root, params_path))
    get_run_logger().info(summary.line())
    return summary
