"""Deployments: prefect.yaml takes its cron from params; a cron deployment gets scheduled runs."""

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from cammsr.ops.stages import Project
from flows.deployments import ONBOARD, PIPELINE, REFRESH, build_deployments
from tests.params_builder import params_dict, write_params

REPO = Path(__file__).resolve().parents[2]  # for prefect.yaml, the file under test; never its params.yaml


@pytest.fixture
def project(tmp_path) -> Project:
    """A project folder whose params.yaml is the test's, with a cron no default has."""
    write_params(tmp_path / "params.yaml", params_dict(overrides={"orchestration": {"refresh_cron": "17 5 * * 2"}}))
    return Project.at(tmp_path)


def _templated_prefect_yaml(params_path: Path) -> tuple[dict, list[dict]]:
    """prefect.yaml's build step run as `prefect deploy` runs it, and the deployments templated with its output."""
    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.templating import apply_values

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    build = [{name: {**args, "params_path": str(params_path)}} for step in config["build"]
             for name, args in step.items()]
    outputs = asyncio.run(run_steps(build, {}, print_function=lambda *_: None))
    pull = apply_values(config["pull"], outputs)
    return pull, [apply_values(d, outputs) for d in config["deployments"]]


@pytest.mark.slow  # the Prefect test server
@pytest.mark.usefixtures("prefect_harness")  # run_steps reports step events to a server
def test_prefect_yaml_cron_comes_from_params(tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml", params_dict(overrides={"orchestration": {"refresh_cron": "*/5 * * * *"}}))
    monkeypatch.chdir(tmp_path)  # `prefect deploy` runs from the project root
    pull, deployments = _templated_prefect_yaml(tmp_path / "params.yaml")
    by_name = {d["name"]: d for d in deployments}
    assert sorted(by_name) == sorted([REFRESH, PIPELINE, ONBOARD])
    assert by_name[REFRESH]["schedules"] == [{"cron": "*/5 * * * *"}]
    assert all("schedules" not in by_name[n] for n in (PIPELINE, ONBOARD))
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path.resolve())}}]
    assert by_name[PIPELINE]["parameters"] == {"root": str(tmp_path.resolve()),
                                               "params_path": str((tmp_path / "params.yaml").resolve())}


def test_prefect_yaml_entrypoints_load_the_flows(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"]: load_flow_from_entrypoint(d["entrypoint"]).name for d in config["deployments"]}
    assert names == {REFRESH: "refresh-features", PIPELINE: "pipeline", ONBOARD: "onboard-catalog"}


def test_served_deployments_take_the_cron_from_params(project):
    deployments = build_deployments(project)
    by_name = {d.name: d for d in deployments}
    assert by_name[REFRESH].schedules[0].schedule.cron == "17 5 * * 2"
    assert not by_name[PIPELINE].schedules and not by_name[ONBOARD].schedules
    assert by_name[ONBOARD].entrypoint == "flows.onboard.onboard_catalog"
    where = {"root": str(project.root), "params_path": str(project.params_path)}
    assert all(d.parameters == where for d in deployments)
    assert build_deployments(project, cron="* * * * *")[0].schedules[0].schedule.cron == "* * * * *"


@pytest.mark.slow  # the Prefect test server
@pytest.mark.usefixtures("prefect_harness")
def test_cron_deployment_gets_scheduled_runs(project):
    """Create the refresh deployment on the test server and list its scheduled runs.

    The test server does not run Prefect's scheduler service (a `prefect server start` does), so the
    test asks the server's schedule endpoint to do what that service does every few seconds.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deployment = build_deployments(project, cron="30 4 * * *")[0]
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        assert stored.name == REFRESH and stored.schedules[0].schedule.cron == "30 4 * * *"
        assert stored.parameters == {"root": str(project.root), "params_path": str(project.params_path)}
        resp = client._client.post(f"/deployments/{deployment_id}/schedule", json={"max_runs": 3})
        resp.raise_for_status()
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    scheduled = sorted(r.expected_start_time for r in runs if r.state and r.state.is_scheduled())
    assert len(scheduled) == 3
    now = datetime.now(UTC)
    assert all(t > now and (t.hour, t.minute) == (4, 30) for t in scheduled)
    assert [(b - a).days for a, b in zip(scheduled, scheduled[1:], strict=False)] == [1, 1]
