"""The source folders a stage's code lives in, read off the import graph (grimp).

A stage's code deps in dvc.yaml are every sub-package (``cammsr/data``, ``features``...) holding a module
that its entry module imports, directly or not, lazy imports inside functions included. Listing whole
sub-packages rather than files means a module added to a package is covered before anyone lists it.
"""

from __future__ import annotations

import importlib.util
from functools import cache

ROOT_PACKAGES = ("cammsr", "features", "flows", "demo")


@cache
def _graph():
    import grimp

    return grimp.build_graph(*ROOT_PACKAGES, cache_dir=None)


def imported_modules(module: str) -> set[str]:
    """``module`` and every project module it imports, transitively."""
    return {module, *_graph().find_upstream_modules(module)}


def source_folder(module: str) -> str:
    """The dvc.yaml dep that covers ``module``: its sub-package folder, or its file at a package's top."""
    parts = module.split(".")
    if parts[0] != "cammsr":
        return parts[0]  # features, demo: small packages, tracked whole
    if len(parts) == 1:
        return "cammsr/__init__.py"
    if importlib.util.find_spec(f"cammsr.{parts[1]}").submodule_search_locations is not None:
        return f"cammsr/{parts[1]}"
    return f"cammsr/{parts[1]}.py"


def code_deps(module: str) -> list[str]:
    """Sorted folders (and top-level files) of every module ``module`` runs, its parent packages included."""
    folders = {source_folder(m) for m in imported_modules(module)}
    # importing cammsr.x.y runs cammsr/__init__.py too, which the import graph does not list
    if any(f.startswith("cammsr/") for f in folders):
        folders.add("cammsr/__init__.py")
    return sorted(folders)
