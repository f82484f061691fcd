"""A temp copy of the project with a tiny demo catalog, for end-to-end runs of the DAG."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COPIED = ["cammsr", "features", "flows", "demo", "dvc.yaml", ".dvcignore", "params.yaml"]

TINY = {
    "demo": {"n_users": 80, "n_items": 40, "n_categories": 3, "mean_length": 8.0, "image_size": 32, "seed": 3},
    "features": {"image": {"batch_size": 16}, "text": {"batch_size": 32, "max_length": 32}},
    "train": {"epochs": 2, "hidden_size": 16, "num_layers": 1, "num_heads": 1, "ffn_size": 32, "batch_size": 32,
              "patience": 5},
    "project": {"device": "cpu"},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def make_project_copy(dest: Path, overrides: dict = TINY) -> Path:
    """Copy the code, dvc.yaml and a shrunken params.yaml into ``dest`` as a fresh git + DVC repo."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(params, overrides), sort_keys=False))
    env = project_env()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=dest, check=True, env=env)
    (dest / ".gitignore").write_text("/data/\n")
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "tiny project"], cwd=dest, check=True, env=env)  # DVC needs a HEAD
    return dest


def project_env() -> dict[str, str]:
    """Environment for subprocesses: the venv's bin first (for `cammsr`), everything offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=project_env(), capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory) -> Path:
    """A tiny project on which `dvc repro` has run once (shared by the integration tests)."""
    root = make_project_copy(tmp_path_factory.mktemp("dvcproj"))
    res = dvc(root, "repro")
    assert res.returncode == 0, f"dvc repro failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return root
