"""Which failures the stage tasks retry, and which task runner the params pick."""

import httpx
import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from cammsr.core.config import OrchestrationParams
from cammsr.ingest.download import DownloadError, NotFoundError, TransientError
from cammsr.ingest.formats import FormatError
from flows.runners import TaskRunnerUnavailable, task_runner_for
from flows.tasks import is_transient


def _raised_from(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        raise exc from cause
    except BaseException as err:  # noqa: BLE001 - building a chained exception for the test
        return err


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ReadTimeout("slow"), True),
        (TimeoutError(), True),
        (_raised_from(DownloadError("http://h/x", "gave up after 5 attempts"), TransientError("HTTP 503")), True),
        (_raised_from(RuntimeError("stage failed"), httpx.RemoteProtocolError("dropped")), True),
        (NotFoundError("http://h/x", "HTTP 404 (not found)"), False),
        (_raised_from(NotFoundError("http://h/x", "HTTP 404"), httpx.ConnectError("x")), False),
        (DownloadError("http://h/x", "HTTP 403"), False),
        (FormatError("x.json.gz: records match no Amazon reviews format"), False),
        (ValueError("bug"), False),
        (None, False),
    ],
)
def test_is_transient(exc, expected):
    assert is_transient(exc) is expected


def test_dvc_lock_contention_is_transient():
    from dvc.lock import LockError

    assert is_transient(LockError("Unable to acquire lock"))


def test_threads_runner_is_the_default():
    assert isinstance(task_runner_for(OrchestrationParams()), ThreadPoolTaskRunner)


def test_dask_runner_local_cluster_or_address():
    from prefect_dask import DaskTaskRunner

    from features.distributed import local_cluster

    local = task_runner_for(OrchestrationParams(task_runner="dask", dask_workers=3))
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_class is local_cluster  # non-daemon workers: a stage may start processes
    remote = task_runner_for(OrchestrationParams(task_runner="dask", dask_address="tcp://10.0.0.1:8786"))
    assert remote.address == "tcp://10.0.0.1:8786"


def test_ray_runner_needs_prefect_ray():
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(TaskRunnerUnavailable, match="pip install prefect-ray"):
            task_runner_for(OrchestrationParams(task_runner="ray"))
    else:
        from prefect_ray import RayTaskRunner

        assert isinstance(task_runner_for(OrchestrationParams(task_runner="ray")), RayTaskRunner)
