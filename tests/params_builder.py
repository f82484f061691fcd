"""Params the tests own: complete dicts built from `cammsr.core.config.Params` defaults.

No test reads the working ``params.yaml`` to get its settings: a user who onboards a catalog there
would make every end-to-end test run that catalog too (and fail where its source is unreachable).
Each test names its catalogs; every other section starts at the code's defaults (the values the
committed params.yaml documents) and takes the test's overrides. The one test of the working file
itself is tests/cammsr/core/test_config.py::test_the_working_params_yaml_loads.

    write_params(root / "params.yaml", tiny_params())                 # the demo catalog, tiny sizes
    write_params(path, params_dict({"toys": {...}}, {"train": {"epochs": 1}}))
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from cammsr.core.config import Params
from cammsr.ops.registry import DEMO_SOURCE_DIR
from demo.generate import META_FILE, REVIEWS_FILE

# The demo catalog at a size an end-to-end run finishes in seconds (80 users, 2 epochs, one 16-wide layer).
TINY: dict[str, Any] = {
    "demo": {"n_users": 80, "n_items": 40, "n_categories": 3, "mean_length": 8.0, "image_size": 32, "seed": 3},
    "features": {"image": {"batch_size": 16}, "text": {"batch_size": 32, "max_length": 32}},
    "train": {"epochs": 2, "hidden_size": 16, "num_layers": 1, "num_heads": 1, "ffn_size": 32, "batch_size": 32,
              "patience": 5},
    "project": {"device": "cpu"},
}


def demo_catalog() -> dict[str, Any]:
    """The demo catalog entry: the files the ``demo_source`` stage writes, watched through its folder."""
    return {"reviews": f"file:{DEMO_SOURCE_DIR}/{REVIEWS_FILE}", "meta": f"file:{DEMO_SOURCE_DIR}/{META_FILE}",
            "images": True, "source_dep": DEMO_SOURCE_DIR}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``over`` merged in (nested dicts merged, anything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def params_dict(catalogs: dict[str, dict[str, Any]] | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every section at its `Params` default, exactly ``catalogs`` (default: the demo), then ``overrides``.

    Validated here, so a typo in an override fails in the test that made it, not in a subprocess.
    """
    overrides = overrides or {}
    if "catalogs" in overrides:
        raise ValueError("pass catalogs as `catalogs`, not in overrides (they would be merged, not replaced)")
    catalogs = {"demo": demo_catalog()} if catalogs is None else catalogs
    dumped = Params(catalogs=catalogs).model_dump(mode="json")
    dumped["catalogs"] = copy.deepcopy(catalogs)  # as the test wrote them, like a user's params.yaml
    raw = merge(dumped, overrides)
    Params.model_validate(raw)
    return raw


def tiny_params(catalogs: dict[str, dict[str, Any]] | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`params_dict` with the `TINY` sizes under ``overrides``."""
    return params_dict(catalogs, merge(TINY, overrides or {}))


def write_params(path: Path, params: dict[str, Any]) -> Path:
    """Write ``params`` as YAML (section order kept) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
