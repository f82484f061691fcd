"""A temp copy of the project with a tiny demo catalog, for end-to-end runs of the DAG.

The copy's params.yaml is the test's own (`tests.params_builder`): the repo's params.yaml is never read,
so the catalogs a user has onboarded there do not run here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.params_builder import TINY, tiny_params, write_params

__all__ = ["REPO", "TINY", "copy_project_files", "dvc", "make_project_copy", "popularity_by_hand",
           "project_env"]

REPO = Path(__file__).resolve().parents[2]
COPIED = ["cammsr", "features", "flows", "demo", "dvc.yaml", ".dvcignore"]  # code and DAG only, never params.yaml


def copy_project_files(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the code and dvc.yaml into ``dest`` and write ``params`` (default: `tiny_params()`) as its params.yaml.

    ``params`` is the whole file: its catalogs are the only ones DVC's foreach stages expand to.
    """
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    write_params(dest / "params.yaml", tiny_params() if params is None else params)
    return dest


def make_project_copy(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """`copy_project_files`, then make ``dest`` a fresh git + DVC repo with one commit."""
    copy_project_files(dest, params)
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


def popularity_by_hand(split, ks) -> dict[str, float]:
    """Most-popular's test metrics counted without cammsr.evaluate: an item's score is its count in the users'
    training parts (all but the last two items), items that tie with the target rank above it, and
    HR = hit, NDCG = 1 / log2(rank + 2), MRR = 1 / (rank + 1) for a 0-based rank below k."""
    counts = np.zeros(split.num_items + 1)
    for seq in split.sequences:
        np.add.at(counts, seq[:-2] if len(seq) >= 3 else seq, 1)
    targets = [seq[-1] for seq in split.sequences if len(seq) >= 3]
    ranks = np.array([(counts[1:] >= counts[t]).sum() - 1 for t in targets])  # column 0 (padding) never ranks
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.mean()
        out[f"ndcg@{k}"] = np.where(hit, 1 / np.log2(ranks + 2.0), 0).mean()
        out[f"mrr@{k}"] = np.where(hit, 1 / (ranks + 1.0), 0).mean()
    return out
