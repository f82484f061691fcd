"""dvc.yaml, rendered from the stage registry: ``cammsr dvc-yaml`` writes it, ``--check`` compares.

Per-catalog stages become ``foreach: ${catalogs}`` stages; their paths are `CatalogPaths` of
``${project.data_dir}/${key}``, so the code and dvc.yaml cannot disagree on where an artifact lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cammsr.core.atomic import atomic_path
from cammsr.core.paths import CatalogPaths
from cammsr.ops.code_deps import code_deps
from cammsr.ops.registry import SOURCE, STAGES, Out, StageSpec, out_path, stage_outputs

HEADER = """\
# GENERATED from the stage registry (cammsr/ops/registry.py) by `cammsr dvc-yaml`: edit the registry, not
# this file (a test fails when they differ). The DAG, once per catalog in params.yaml (foreach); every cmd
# calls the `cammsr` CLI, which runs the same stage functions as the Prefect flows (flows/).
#   dvc repro                          # everything that changed
#   dvc repro evaluate@demo            # one catalog up to its metrics
#   dvc exp run -S train.model=sasrec  # an experiment
# Code deps are the source folders of every module a stage's entry function imports (cammsr/ops/code_deps.py).
"""
CATALOG_PATHS = CatalogPaths(Path("${project.data_dir}") / "${key}")  # DVC templates, not a catalog name


def _out_entry(out: Out, path: Path) -> str | dict[str, Any]:
    options: dict[str, Any] = {}
    if out.persist:
        options["persist"] = True
    if not out.cache:
        options["cache"] = False
    if out.plot_x:
        options["x"] = out.plot_x
    return {str(path): options} if options else str(path)


def stage_entry(stage: StageSpec) -> dict[str, Any]:
    """The dvc.yaml body of one stage (``do:`` of a foreach stage)."""
    paths = CATALOG_PATHS
    cmd = f"{stage.cli} --catalog ${{key}}" if stage.per_catalog else stage.cli
    deps = ["${item.source_dep}" if d == SOURCE else str(getattr(paths, d)) for d in stage.deps]
    deps += code_deps(stage.module)
    body: dict[str, Any] = {"cmd": cmd, "deps": deps}
    if stage.params:
        body["params"] = [p.replace("{catalog}", "${key}") for p in stage.params]
    by_role: dict[str, list] = {"out": [], "metric": [], "plot": []}
    for out in stage.outs:
        by_role[out.role].append(_out_entry(out, out_path(out, paths)))
    if stage.per_catalog:  # every per-catalog stage writes its summary; DVC keeps it out of the cache
        by_role["out"].append({str(paths.summary(stage.name)): {"cache": False}})
    for role, key in (("out", "outs"), ("metric", "metrics"), ("plot", "plots")):
        if by_role[role]:
            body[key] = by_role[role]
    return body


def render() -> str:
    """The whole dvc.yaml text."""
    stages: dict[str, Any] = {}
    for stage in STAGES:
        body = stage_entry(stage)
        stages[stage.name] = {"foreach": "${catalogs}", "do": body} if stage.per_catalog else body
    notes = [f"#   {s.name}: {out_path(o, CATALOG_PATHS)}: {o.note}" for s in STAGES for o in s.outs if o.note]
    text = yaml.safe_dump({"stages": stages}, sort_keys=False, width=120, default_flow_style=False)
    return HEADER + ("# Outputs kept in place across reruns:\n" + "\n".join(notes) + "\n" if notes else "") + text


def check(path: Path) -> list[str]:
    """Differences between ``path`` and the rendered dvc.yaml, as unified-diff lines (empty: in step)."""
    import difflib

    current = path.read_text() if path.exists() else ""
    return list(difflib.unified_diff(current.splitlines(), render().splitlines(), str(path), "registry",
                                     lineterm=""))


def write(path: Path) -> bool:
    """Write the rendered dvc.yaml to ``path`` (atomically); True when it changed."""
    text = render()
    if path.exists() and path.read_text() == text:
        return False
    with atomic_path(path, suffix=".yaml") as tmp:
        tmp.write_text(text)
    return True


__all__ = ["render", "check", "write", "stage_entry", "stage_outputs"]
