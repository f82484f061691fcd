"""Onboard a new raw catalog: check its sources, then add it to params.yaml (and nothing else).

    cammsr onboard toys --reviews file:///data/reviews_Toys_5.json.gz --meta file:///data/meta_Toys.json.gz
    cammsr onboard toys ... --dry-run        # the source report and the params.yaml diff, no change

`plan_onboarding` fetches and checks the sources (`cammsr.ops.source_check`) into a staging folder and
computes the new params.yaml text; nothing in the project changes. `apply_plan` then moves the
fetched files to where ingest looks for them (so they are not downloaded twice) and writes
params.yaml; `discard_plan` removes the staging folder. Running the pipeline for the new catalog is
the driver's job (`flows.onboard`, the CLI).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cammsr.core.config import PrecomputedFeatures, load_params
from cammsr.core.paths import CatalogPaths
from cammsr.ingest.download import RetryPolicy, local_path
from cammsr.ops.params_edit import ParamsEditError, add_catalog_text, unified_diff, write_if_unchanged
from cammsr.ops.source_check import SourceError, SourceReport, check_source

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a DVC foreach key, a folder name, a Prefect artifact key
ImagesChoice = Literal["yes", "no", "auto"]


@dataclass
class OnboardPlan:
    """What onboarding would do: the checked sources, the new params entry and the new params text."""

    name: str
    entry: dict[str, object]
    report: SourceReport
    params_path: Path
    old_text: str
    new_text: str
    staging: Path  # holds raw/ (the fetched files + manifest) until apply or discard
    notes: list[str] = field(default_factory=list)

    def diff(self) -> str:
        return unified_diff(self.old_text, self.new_text, self.params_path.name)

    def lines(self) -> list[str]:
        return [*self.report.lines(), *self.notes]


def parse_images(value: str | bool) -> ImagesChoice:
    """``yes``/``no``/``auto`` (also true/false); anything else is a ValueError naming the option."""
    text = str(value).strip().lower()
    choice = {"yes": "yes", "true": "yes", "no": "no", "false": "no", "auto": "auto"}.get(text)
    if choice is None:
        raise ValueError(f"--images must be yes, no or auto, not {value!r}")
    return choice  # type: ignore[return-value]


def source_dep(reviews: str, meta: str | None, root: Path, others: list[str] | None = None) -> str:
    """What DVC should watch to rerun ingest: the folder of local sources, or the reviews' http URL.

    ``others``: more source files (precomputed features, their index); the local ones share the folder.

    Raises:
        SourceError: local sources share no folder but ``/``.
    """
    if urlsplit(reviews).scheme.lower() in ("http", "https"):
        return reviews  # DVC checks an http dependency by its ETag
    candidates = [meta] if meta else []
    candidates += others or []
    files = [reviews] + [u for u in candidates if local_path(u, root) is not None]
    raw = [local_path(u, root) for u in files]  # absolute: relative ones are taken under root
    folders = {Path(os.path.normpath(p)).parent for p in raw if p is not None}
    common = Path(os.path.commonpath([str(f) for f in folders]))
    if str(common) in ("/", ""):
        raise SourceError(f"{reviews} and {meta}: local sources must share a folder (DVC watches one path)")
    try:
        return common.resolve().relative_to(root.resolve()).as_posix()  # inside the project: relative
    except ValueError:
        return str(common.resolve())


def precomputed_sources(text_features: str | None = None, image_features: str | None = None,
                        feature_index: str | None = None, feature_format: str = "auto",
                        provenance: str = "") -> dict[str, PrecomputedFeatures]:
    """The ``--text-features`` / ``--image-features`` options as params entries (one index for both)."""
    out = {}
    for modality, url in (("text", text_features), ("image", image_features)):
        if url:
            out[modality] = PrecomputedFeatures(file=url, index=feature_index, format=feature_format,
                                                provenance=provenance)
    if feature_index and not out:
        raise ValueError("--feature-index needs --text-features or --image-features")
    return out


def plan_onboarding(name: str, reviews: str, meta: str | None, images: ImagesChoice | str = "auto", *,
                    root: Path = Path("."), params_path: Path = Path("params.yaml"),
                    policy: RetryPolicy | None = None,
                    features: dict[str, PrecomputedFeatures] | None = None) -> OnboardPlan:
    """Check the sources of catalog ``name`` and compute the params.yaml edit; the project is not touched.

    ``features``: precomputed feature files by modality (`precomputed_sources`), fetched and checked
    with the other sources and written into the catalog's entry.

    Raises:
        ValueError: a bad name or ``images`` value.
        SourceError: a source is unreachable, empty, of the wrong format or unusable (names the URL).
        ParamsEditError: the catalog exists already, or params.yaml cannot take the entry.
    """
    root = Path(root).resolve()
    params_path = params_path if Path(params_path).is_absolute() else root / params_path
    if not NAME.fullmatch(name):
        raise ValueError(f"catalog name {name!r}: use letters, digits, '-' and '_' (at most 64, no leading '-')")
    choice = parse_images(images)
    old_text = params_path.read_text()
    params = load_params(params_path)
    if name in params.catalogs:
        raise ParamsEditError(f"{params_path}: catalogs.{name} exists already; pick another name")
    data_dir = root / params.project.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".onboard-{name}-", dir=data_dir))
    try:
        report = check_source(reviews, meta, staging / "raw", policy=policy or RetryPolicy.from_params(params.ingest),
                              root=root, images=choice != "no", user_core=params.splits.user_core,
                              category_level=params.ingest.category_level,
                              max_quarantine_fraction=params.ingest.max_quarantine_fraction,
                              features=features)
        notes = []
        with_images = choice == "yes" or (choice == "auto" and report.has_images)
        if choice == "yes" and not report.has_images:
            notes.append("note: --images yes, but no item has an image URL: every image will be 'missing'")
        if report.users_at_core == 0:
            notes.append(f"warning: no user has {params.splits.user_core} interactions; the "
                         f"{params.splits.user_core}-core split will be empty")
        feature_urls = [u for f in (features or {}).values() for u in f.urls()]
        entry: dict[str, object] = {"reviews": reviews, "meta": meta, "images": with_images,
                                    "source_dep": source_dep(reviews, meta, root, feature_urls)}
        for modality, source in (features or {}).items():
            entry[f"{modality}_features"] = source.model_dump()
        stamp = datetime.now(UTC).strftime("%Y-%m-%d")
        new_text = add_catalog_text(old_text, name, entry, source=str(params_path),
                                    comment=f"onboarded by `cammsr onboard` on {stamp}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return OnboardPlan(name, entry, report, params_path, old_text, new_text, staging, notes)


def apply_plan(plan: OnboardPlan, data_dir: Path) -> CatalogPaths:
    """Move the fetched sources to the catalog's ``raw/`` and write params.yaml; returns the catalog's paths.

    Raises:
        ParamsEditError: params.yaml changed since the plan was made (nothing is written then).
    """
    paths = CatalogPaths.of(plan.name, data_dir)
    try:
        if plan.params_path.read_text() != plan.old_text:
            raise ParamsEditError(f"{plan.params_path}: changed while onboarding; nothing written, run again")
        paths.root.mkdir(parents=True, exist_ok=True)
        if paths.raw_dir.exists():  # left by an earlier attempt that never made it into params.yaml
            shutil.rmtree(paths.raw_dir)
        os.replace(plan.staging / "raw", paths.raw_dir)
        write_if_unchanged(plan.params_path, plan.old_text, plan.new_text)
    finally:
        discard_plan(plan)
    log.info("%s: added catalogs.%s (%s)", plan.params_path, plan.name, plan.entry["source_dep"])
    return paths


def discard_plan(plan: OnboardPlan) -> None:
    """Remove the staging folder (after a dry run, or when the run stops)."""
    shutil.rmtree(plan.staging, ignore_errors=True)
