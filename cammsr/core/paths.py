"""Where each artifact of a catalog lives (the data contracts of ARCHITECTURE.md).

One folder per catalog under ``data/``. Stages take a `CatalogPaths` and never build paths
themselves, so DVC's ``outs`` in dvc.yaml and the code agree in one place.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cammsr.core.errors import BadInput

# A catalog's name is a folder name, a DVC foreach key and a Prefect artifact key: nothing that can climb
# out of data/ ("..", "/") or read differently in any of the three.
CATALOG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CATALOG_NAME_RULE = "letters, digits, '-' and '_', starting with a letter or digit, at most 64"


class UnsafePathError(BadInput, ValueError):
    """A catalog name or an output path that would put files outside the data root."""


def check_catalog_name(name: str) -> str:
    """``name`` if it is a valid catalog name, else an `UnsafePathError` saying why."""
    if not isinstance(name, str) or not CATALOG_NAME.fullmatch(name):
        raise UnsafePathError(f"catalog name {name!r}: use {CATALOG_NAME_RULE}")
    return name


def check_inside(path: str | Path, root: str | Path, what: str = "output") -> Path:
    """``path`` if it stays under ``root`` once ``..`` and symlinks are resolved, else `UnsafePathError`."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"{path}: {what} path resolves to {resolved}, outside {base}; refused")
    return Path(path)


def raw_name(url: str) -> str:
    """A safe file name for ``url``: 16 hex chars of sha1(url) + the sanitized basename."""
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    base = unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[-100:]
    return f"{digest}-{base}" if base else digest


@dataclass(frozen=True)
class CatalogPaths:
    """Paths of every artifact of one catalog, rooted at ``data_dir/name``."""

    root: Path
    out_root: Path | None = None  # where train/evaluate write; None = root (see `for_run`)

    @classmethod
    def of(cls, name: str, data_dir: str | Path = "data") -> CatalogPaths:
        """The paths of catalog ``name`` under ``data_dir``; a name that is not a plain folder name is refused."""
        return cls(Path(data_dir) / check_catalog_name(name))

    def for_run(self, out_root: str | Path) -> CatalogPaths:
        """Same inputs (splits, features), but models/logs/metrics under ``out_root``: one experiment run."""
        return CatalogPaths(self.root, Path(out_root))

    @property
    def _out(self) -> Path:
        return self.out_root if self.out_root is not None else self.root

    def tmp_dir(self, stage: str) -> Path:
        """The temp folder of ``stage``'s runs: cleared when a run starts, removed when it ends."""
        return self._out / ".tmp" / stage

    # ingest
    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    def raw_file(self, url: str) -> Path:
        """Where ingest keeps the file fetched from ``url``."""
        return self.raw_dir / raw_name(url)

    @property
    def manifest(self) -> Path:
        return self.raw_dir / "manifest.json"

    @property
    def precomputed_sources(self) -> Path:
        """Which precomputed feature files a catalog imports, with their sha256 (what the encoders watch)."""
        return self.root / "precomputed.json"

    @property
    def interactions(self) -> Path:
        return self.root / "interactions.parquet"

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def images_table(self) -> Path:
        return self.root / "images.parquet"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"

    # features
    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def text_features(self) -> Path:
        return self.features_dir / "text.parquet"

    @property
    def image_features(self) -> Path:
        return self.features_dir / "image.parquet"

    # splits
    @property
    def splits_dir(self) -> Path:
        return self.root / "splits"

    @property
    def split_features_dir(self) -> Path:
        """Each feature store cut to the split's items (``text.parquet``, ``image.parquet``): what train and
        evaluate read, so an item added to the catalog does not make their inputs change."""
        return self.root / "split_features"

    def split_features(self, modality: str) -> Path:
        return self.split_features_dir / f"{modality}.parquet"

    def feature_store(self, modality: str) -> Path:
        """The whole feature store of ``modality`` (``text`` or ``image``), every catalog item."""
        return self.features_dir / f"{modality}.parquet"

    # train / evaluate
    @property
    def models_dir(self) -> Path:
        return self._out / "models"

    @property
    def checkpoint(self) -> Path:
        return self.models_dir / "model.pt"

    @property
    def train_log_dir(self) -> Path:
        return self._out / "train_log"

    @property
    def train_metrics(self) -> Path:
        """dvclive's per-run summary of the training curves (DVC metrics)."""
        return self.train_log_dir / "metrics.json"

    @property
    def train_plots(self) -> Path:
        """dvclive's per-epoch curves (DVC plots)."""
        return self.train_log_dir / "plots" / "metrics"

    @property
    def metrics(self) -> Path:
        return self._out / "metrics.json"

    @property
    def eval_dir(self) -> Path:
        return self._out / "eval"

    @property
    def recommendations(self) -> Path:
        """Top-k items per user of the trained model (the recommend stage)."""
        return self._out / "recommendations.parquet"

    def summary(self, stage: str) -> Path:
        """The JSON summary a stage writes next to its outputs (rows in/out, seconds...)."""
        return self._out / "summaries" / f"{stage}.json"
