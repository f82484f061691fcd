"""The features stages: ``encode_text`` and ``encode_image`` (called by the CLI, DVC and Prefect).

Each reads the ingest outputs of one catalog, upserts its Parquet feature store (see
`features.store`) and returns a `StageSummary` that it also writes to
``summaries/encode_{text,image}.json``. Models load lazily: a rerun with nothing to encode
never touches them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from cammsr.core.config import ImageFeatureParams, PrecomputedFeatures, TextFeatureParams
from cammsr.core.device import pick_device
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from features.image import RANDOM_INIT_SEED, ImageSpec
from features.imported import import_from_raw
from features.store import DEFAULT_CHUNK_SIZE, EncodedChunk, UpsertReport, upsert
from features.text import TEMPLATE_FIELDS, TextSpec, TextTemplate, package_version

log = logging.getLogger(__name__)

MAX_FAILURE_NOTES = 20  # failures listed one per line in the summary; the rest are counted


def read_columns(path: Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    """Columns of a Parquet file as Python lists; errors name the file and missing columns."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (run `cammsr ingest` for this catalog first)")
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (found {names})")
    table = pq.read_table(path, columns=list(columns))
    return {c: table.column(c).to_pylist() for c in columns}


def _check_unique(item_ids: Sequence[str], path: Path) -> None:
    if len(set(item_ids)) != len(item_ids):
        dupes = [item for item, n in Counter(item_ids).items() if n > 1]
        raise ValueError(f"{path}: item_id must be unique, found {len(dupes)} repeated (e.g. {dupes[:3]})")


class _Lazy:
    """Build an encoder on first use, so a run with nothing to encode loads no model."""

    def __init__(self, build: Callable[[], Any]):
        self._build, self._value = build, None

    def __call__(self) -> Any:
        if self._value is None:
            self._value = self._build()
        return self._value


def _filled(value: Any) -> bool:
    """A field that holds text: not null, not blank, not an empty list."""
    if isinstance(value, str):
        return bool(value.strip())
    return bool(value)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _summary(
    stage: str, name: str, report: UpsertReport, started: float, extra: dict[str, Any], where: str
) -> StageSummary:
    counts: dict[str, Any] = {
        "encoded": report.encoded,
        "reused": report.reused,
        "resumed": report.resumed,
        "removed": report.removed,
        "failed": len(report.failures),
        **extra,
        "total": report.total,
        "dim": report.dim,
        "items_per_s": round(report.items_per_s, 1),
    }
    notes: list[str] = [f"encoded on: {where}"]
    if report.rebuilt:
        notes.append("model identity changed: the store was rebuilt from scratch")
    if report.failures:
        kinds = Counter(reason.split(":")[0] for reason in report.failures.values())
        notes.append("failed: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()))
        notes += [f"{item}: {reason}" for item, reason in list(report.failures.items())[:MAX_FAILURE_NOTES]]
        if len(report.failures) > MAX_FAILURE_NOTES:
            notes.append(f"... and {len(report.failures) - MAX_FAILURE_NOTES} more failures")
    return StageSummary(stage, name, counts, time.perf_counter() - started, notes)


def _upsert(
    store: Path,
    item_ids: Sequence[str],
    shas: Sequence[str],
    inputs: Sequence[Any],
    spec: TextSpec | ImageSpec,
    identity: dict[str, Any],
    info: dict[str, str],
    *,
    runner: str,
    dask_address: str | None,
    dask_workers: int,
    chunk_size: int,
    desc: str,
) -> tuple[UpsertReport, str]:
    """`upsert` with the chunks encoded here (``local``) or on Dask workers; -> report, where it ran."""
    if runner not in ("local", "dask"):
        raise ValueError(f"features.runner {runner!r}: expected 'local' or 'dask'")
    if runner == "dask":
        from features.distributed import DaskPartsRunner, in_dask_worker

        if in_dask_worker():
            log.warning("%s: already inside a Dask worker, encoding in this process instead", desc)
        else:
            if dask_address is None:  # a bad device fails here, not on every worker
                pick_device(spec.device)
            parts_runner = DaskPartsRunner(spec, inputs, dask_address, dask_workers)
            where = f"dask {dask_address}" if dask_address else f"dask LocalCluster x{dask_workers}"
            report = upsert(
                store, item_ids, shas, identity, run_parts=parts_runner, parallelism=dask_workers,
                info=info, empty_dim=lambda: spec.build().dim, chunk_size=chunk_size, desc=desc,
            )  # fmt: skip
            return report, where
    pick_device(spec.device)  # a bad device is an error even when nothing needs encoding
    encoder = _Lazy(spec.build)

    def encode(positions: Sequence[int], progress: Callable[[int], None]) -> EncodedChunk:
        local = spec.encode(encoder(), [inputs[p] for p in positions], progress)
        return EncodedChunk(
            [positions[i] for i in local.positions],
            local.embeddings,
            {positions[i]: reason for i, reason in local.failures.items()},
        )

    report = upsert(
        store, item_ids, shas, identity, encode, info=info, empty_dim=lambda: encoder().dim,
        warm_up=encoder, chunk_size=chunk_size, desc=desc,
    )  # fmt: skip
    return report, "local"


def encode_text(
    name: str,
    params: TextFeatureParams,
    paths: CatalogPaths,
    device: str = "auto",
    *,
    runner: str = "local",
    dask_address: str | None = None,
    dask_workers: int = 2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    precomputed: PrecomputedFeatures | None = None,
) -> StageSummary:
    """Upsert ``paths.text_features`` with one embedding per item of ``paths.items``.

    ``runner``/``dask_address``/``dask_workers``/``chunk_size`` are ``features.*`` in params:
    ``dask`` encodes on Dask workers (`features.distributed`), ``local`` in this process.
    With ``precomputed`` (the catalog's ``text_features``), the features are imported from that
    file instead (`features.imported`).
    """
    if precomputed is not None:
        return import_from_raw(name, "text", precomputed, paths)
    started = time.perf_counter()
    template = TextTemplate(params.template)
    cols = read_columns(paths.items, ["item_id", *TEMPLATE_FIELDS])
    _check_unique(cols["item_id"], paths.items)
    fields = [dict(zip(TEMPLATE_FIELDS, row, strict=True)) for row in zip(*(cols[f] for f in TEMPLATE_FIELDS),
                                                                          strict=True)]
    has_text = [any(_filled(f[name]) for name in params.require_any) for f in fields]
    item_ids = [i for i, keep in zip(cols["item_id"], has_text, strict=True) if keep]
    texts = [template.render(f) for f, keep in zip(fields, has_text, strict=True) if keep]
    identity = {
        "modality": "text",
        "model": params.model,
        "model_version": package_version(params.model),
        "revision": params.revision,
        "pooling": params.pooling,
        "max_length": params.max_length,
        "template": params.template,
    }
    info = {
        "dtype": params.dtype,
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
    }
    report, where = _upsert(
        paths.text_features, item_ids, [_sha256(t) for t in texts], texts, TextSpec(params, device), identity,
        info, runner=runner, dask_address=dask_address, dask_workers=dask_workers, chunk_size=chunk_size,
        desc=f"encode text [{name}]",
    )  # fmt: skip
    extra = {"no_text": len(has_text) - len(item_ids), "empty_text": sum(not t for t in texts)}
    summary = _summary("encode_text", name, report, started, extra, where)
    summary.write(paths.summary("encode_text"))
    return summary


def encode_image(
    name: str,
    params: ImageFeatureParams,
    paths: CatalogPaths,
    device: str = "auto",
    max_image_pixels: int = 40_000_000,
    *,
    runner: str = "local",
    dask_address: str | None = None,
    dask_workers: int = 2,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    precomputed: PrecomputedFeatures | None = None,
) -> StageSummary:
    """Upsert ``paths.image_features`` with one embedding per item that has a usable image.

    Items whose ingest status is not ``ok`` are counted as ``no_image`` and get no row; images
    listed ``ok`` that cannot be read, verified or decoded here are ``failed`` (reasons in notes).
    The scale-out keywords are as for `encode_text`; ``precomputed`` (the catalog's
    ``image_features``) imports the features from that file instead of encoding images.
    """
    if precomputed is not None:
        return import_from_raw(name, "image", precomputed, paths)
    started = time.perf_counter()
    table = read_columns(paths.images_table, ["item_id", "path", "sha256", "status"])
    item_ids = table["item_id"]  # every item of the catalog, with the status of its image
    _check_unique(item_ids, paths.images_table)
    image_of = {
        item: (path, sha)
        for item, path, sha, status in zip(
            table["item_id"], table["path"], table["sha256"], table["status"], strict=True
        )
        if status == "ok" and path and sha
    }
    wanted = [item for item in item_ids if item in image_of]
    inputs = [(paths.root / image_of[item][0], image_of[item][1]) for item in wanted]
    identity = {
        "modality": "image",
        "model": params.model,
        "pretrained": params.pretrained,
        "random_init_seed": None if params.pretrained else RANDOM_INIT_SEED,
        "pooling": "encode_image (not normalized)",
        "decode": "jpeg draft to the input side",  # see features.image.decode_image
    }
    info = {
        "dtype": params.dtype,
        "torch_version": torch.__version__,
        "open_clip_version": _version("open_clip_torch"),
    }
    report, where = _upsert(
        paths.image_features, wanted, [sha for _, sha in inputs], inputs,
        ImageSpec(params, device, max_image_pixels), identity, info, runner=runner, dask_address=dask_address,
        dask_workers=dask_workers, chunk_size=chunk_size, desc=f"encode images [{name}]",
    )  # fmt: skip
    extra = {"no_image": len(item_ids) - len(wanted)}
    summary = _summary("encode_image", name, report, started, extra, where)
    summary.write(paths.summary("encode_image"))
    return summary
