"""Where each artifact of a catalog lives (the data contracts of ARCHITECTURE.md).

One folder per catalog under ``data/``. Stages take a `CatalogPaths` and never build paths
themselves, so DVC's ``outs`` in dvc.yaml and the code agree in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogPaths:
    """Paths of every artifact of one catalog, rooted at ``data_dir/name``."""

    root: Path

    @classmethod
    def of(cls, name: str, data_dir: str | Path = "data") -> CatalogPaths:
        return cls(Path(data_dir) / name)

    # ingest
    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def manifest(self) -> Path:
        return self.raw_dir / "manifest.json"

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

    # train / evaluate
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def checkpoint(self) -> Path:
        return self.models_dir / "model.pt"

    @property
    def train_log_dir(self) -> Path:
        return self.root / "train_log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def summary(self, stage: str) -> Path:
        """The JSON summary a stage writes next to its outputs (rows in/out, seconds...)."""
        return self.root / "summaries" / f"{stage}.json"
