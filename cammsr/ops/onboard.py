"""Onboard a new raw catalog: check its sources, then add it to params.yaml (and nothing else).

    cammsr onboard toys --reviews file:///data/reviews_Toys_5.json.gz --meta file:///data/meta_Toys.json.gz
    cammsr onboard toys ... --dry-run        # the source report and the params.yaml diff, no change

`plan_onboarding` fetches and checks the sources (`cammsr.ops.source_check`) into a staging folder and
computes the new params.yaml text; nothing in the project changes. A catalog the split could not use
(its k-core leaves no user with a test target) is refused there, with the ``--min-interactions`` that
would work; that option becomes the catalog's own k-core (``catalogs.NAME.min_interactions``).
`apply_plan` then moves the fetched files to where ingest looks for them (so they are not downloaded
twice) and writes params.yaml; `discard_plan` removes the staging folder. Running the pipeline for the
new catalog is the driver's job (`flows.onboard`, the CLI). `undo_onboarding` (``cammsr onboard --undo
NAME``) takes an onboarded catalog out again: its params.yaml lines, its data folder, its dvc.lock entries.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cammsr.core.config import PrecomputedFeatures, load_params
from cammsr.core.paths import CATALOG_NAME, CATALOG_NAME_RULE, CatalogPaths, check_catalog_name, check_inside
from cammsr.ingest.download import RetryPolicy, local_path
from cammsr.ingest.formats import TimestampWindow
from cammsr.ops.params_edit import (
    ONBOARD_COMMENT,
    ParamsEditError,
    add_catalog_text,
    remove_catalog_text,
    unified_diff,
    write_if_unchanged,
)
from cammsr.ops.source_check import SourceError, SourceReport, check_source

log = logging.getLogger(__name__)

NAME = CATALOG_NAME  # a DVC foreach key, a folder name, a Prefect artifact key
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
                    features: dict[str, PrecomputedFeatures] | None = None,
                    min_interactions: int | None = None) -> OnboardPlan:
    """Check the sources of catalog ``name`` and compute the params.yaml edit; the project is not touched.

    ``features``: precomputed feature files by modality (`precomputed_sources`), fetched and checked
    with the other sources and written into the catalog's entry. ``min_interactions``: the catalog's own
    k-core (else ``splits.user_core`` / ``item_core``), written into its entry.

    Raises:
        ValueError: a bad name, ``images`` or ``min_interactions`` value.
        SourceError: a source is unreachable, empty, of the wrong format or unusable (names the URL), or
            the k-core leaves no user with a test target (names a ``--min-interactions`` that would).
        ParamsEditError: the catalog exists already, or params.yaml cannot take the entry.
    """
    root = Path(root).resolve()
    params_path = params_path if Path(params_path).is_absolute() else root / params_path
    if not NAME.fullmatch(name):
        raise ValueError(f"catalog name {name!r}: use {CATALOG_NAME_RULE}")
    if min_interactions is not None and (isinstance(min_interactions, bool) or min_interactions < 1):
        raise ValueError(f"--min-interactions must be a positive integer, not {min_interactions!r}")
    choice = parse_images(images)
    old_text = params_path.read_text()
    params = load_params(params_path)
    if name in params.catalogs:
        raise ParamsEditError(f"{params_path}: catalogs.{name} exists already; pick another name")
    data_dir = root / params.project.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".onboard-{name}-", dir=data_dir))
    try:
        user_core = params.splits.user_core if min_interactions is None else min_interactions
        item_core = params.splits.item_core if min_interactions is None else min_interactions
        window = TimestampWindow.from_params(params.ingest.min_review_date, params.ingest.max_days_ahead)
        report = check_source(reviews, meta, staging / "raw", policy=policy or RetryPolicy.from_params(params.ingest),
                              root=root, images=choice != "no", user_core=user_core, item_core=item_core,
                              category_level=params.ingest.category_level,
                              max_quarantine_fraction=params.ingest.max_quarantine_fraction,
                              features=features, timestamps=window)
        notes = []
        with_images = choice == "yes" or (choice == "auto" and report.has_images)
        if choice == "yes" and not report.has_images:
            notes.append("note: --images yes, but no item has an image URL: every image will be 'missing'")
        feature_urls = [u for f in (features or {}).values() for u in f.urls()]
        entry: dict[str, object] = {"reviews": reviews, "meta": meta, "images": with_images,
                                    "source_dep": source_dep(reviews, meta, root, feature_urls)}
        if min_interactions is not None:
            entry["min_interactions"] = min_interactions
        for modality, source in (features or {}).items():
            entry[f"{modality}_features"] = source.model_dump()
        stamp = datetime.now(UTC).strftime("%Y-%m-%d")
        new_text = add_catalog_text(old_text, name, entry, source=str(params_path),
                                    comment=f"{ONBOARD_COMMENT} on {stamp}")
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


def undo_onboarding(name: str, *, root: Path = Path("."), params_path: Path = Path("params.yaml")) -> list[str]:
    """Take out a catalog that ``cammsr onboard`` added: its params.yaml lines, data folder and dvc.lock entries.

    Only an entry that onboarding wrote (the comment above it says so) is removed, and only when removing
    its lines gives a file that onboarding would turn back into the current one; anything else is
    refused, so a hand-written catalog or a hand-edited file is never cut into.

    Returns:
        What was removed, one line each.

    Raises:
        ValueError / UnsafePathError: a bad name.
        ParamsEditError: the catalog is not in params.yaml, was not added by onboarding, or its lines
            cannot be taken out cleanly (params.yaml is then unchanged).
    """
    check_catalog_name(name)
    root = Path(root).resolve()
    params_path = params_path if Path(params_path).is_absolute() else root / params_path
    text = params_path.read_text()
    params = load_params(params_path)
    data_root = root / params.project.data_dir
    new_text = remove_catalog_text(text, name, source=str(params_path))
    write_if_unchanged(params_path, text, new_text)
    done = [f"{params_path}: removed catalogs.{name}"]
    folder = check_inside(CatalogPaths.of(name, data_root).root, data_root, "catalog folder")
    if folder.exists():
        shutil.rmtree(folder)
        done.append(f"{folder}: removed")
    for leftover in [*data_root.glob(f".onboard-{name}-*"), *data_root.glob(f".locks/*@{name}.lock*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    removed = _drop_lock_entries(root / "dvc.lock", name)
    if removed:
        done.append(f"{root / 'dvc.lock'}: removed {', '.join(removed)}")
    for line in done:
        log.info(line)
    return done


def _drop_lock_entries(lock: Path, name: str) -> list[str]:
    """Remove the ``<stage>@<name>`` entries of dvc.lock (round trip: the rest stays as DVC wrote it)."""
    if not lock.is_file():
        return []
    from ruamel.yaml import YAML

    from cammsr.core.atomic import atomic_path

    y = YAML()
    y.width = 4096
    data = y.load(lock.read_text())
    stages = data.get("stages") if hasattr(data, "get") else None
    if not stages:
        return []
    gone = [key for key in list(stages) if str(key).endswith(f"@{name}")]
    for key in gone:
        del stages[key]
    if gone:
        with atomic_path(lock, suffix=".lock") as tmp, open(tmp, "w") as fh:
            y.dump(data, fh)
    return gone
