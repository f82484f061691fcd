"""Where the pipeline's tasks run, from ``params.orchestration.task_runner``.

- ``threads``: a thread pool in the flow's process (the default; text and image encoding overlap);
- ``dask``: `prefect_dask.DaskTaskRunner` on a LocalCluster of ``dask_workers`` processes (the
  feature encoders' `features.distributed.local_cluster`: one thread each, non-daemon workers so a
  stage may start processes of its own), or on the scheduler at ``dask_address``;
- ``ray``: `prefect_ray.RayTaskRunner` (local Ray, or the cluster named by ``RAY_ADDRESS``), when the
  optional ``prefect-ray`` package is installed.

Tasks only pass strings and return small dataclasses, so they can run in other processes; DVC calls
are serialized across processes by `cammsr.ops.dvc_sync`'s file lock.
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from cammsr.core.config import OrchestrationParams

THREADS = 4  # text + image encoding of two catalogs at once; more only oversubscribes the CPU


class TaskRunnerUnavailable(RuntimeError):
    """The configured task runner needs a package that is not installed; the message says which."""


def task_runner_for(params: OrchestrationParams) -> TaskRunner:
    """The task runner that ``params.task_runner`` names."""
    if params.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=THREADS)
    if params.task_runner == "dask":
        from features.distributed import task_runner

        return task_runner(params.dask_address, params.dask_workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise TaskRunnerUnavailable(
            "orchestration.task_runner: ray needs the prefect-ray package (pip install prefect-ray), "
            "or set it to threads or dask"
        ) from exc
    return RayTaskRunner(init_kwargs={"include_dashboard": False})
