"""Precomputed features as a feature source: read, check and import them into a feature store.

Many public multimodal datasets ship features instead of raw text or images. A catalog's modality
can name such a file (``catalogs.NAME.text_features`` / ``image_features`` in params.yaml); ingest
fetches it into ``raw/`` like the reviews, and the encode stage of that modality imports it instead
of running an encoder. The store it writes has the encoders' contract (item_id, content_sha256,
``fixed_size_list<float32>`` embedding), so training cannot tell the difference; its schema metadata
says ``precomputed: true`` with the file's sha256, format and provenance.

Formats (``format: auto`` picks one from the file's first bytes and the index):

- ``unisrec``: UniSRec / MISSRec ``.featNCLS``: raw little-endian float32 rows, no header; the index
  (``.item2index``) has ``item_id<TAB>row`` lines. The width is the file size / 4 / rows.
- ``mmrec``: MMRec ``image_feat.npy`` / ``text_feat.npy`` ([rows, d]) with ``i_id_mapping.csv``
  (``asin<TAB>itemID`` after a header line).
- ``npy``: a ``.npy`` [rows, d] with an index of one item id per line (line k = row k), or
  ``item_id<TAB or ,>row`` lines.
- ``parquet``: a table with ``item_id`` and ``embedding`` (a list of floats) columns; no index.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cammsr.core.config import PrecomputedFeatures
from cammsr.core.digest import file_sha256
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from features.store import IDENTITY_KEY, FeatureRows, identity_json, read_rows, write_rows

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
PARQUET_MAGIC = b"PAR1"


class FeatureFileError(ValueError):
    """A precomputed feature file or its index is unusable; the message names the file and the row or line."""


@dataclass
class FeatureMatrix:
    """A precomputed feature file, checked: one row per item id."""

    item_ids: list[str]
    embeddings: np.ndarray  # float32 [rows, d]
    format: str
    sha256: str  # of the feature file
    index_sha256: str | None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def detect_format(path: Path, index: Path | None) -> str:
    """``parquet``/``npy``/``mmrec`` from the file's magic bytes and the index; else ``unisrec``."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(NPY_MAGIC):
        return "mmrec" if index is not None and _has_header(index) else "npy"
    return "unisrec"


def _has_header(index: Path) -> bool:
    """True when the index's first line names columns (MMRec's ``asin<TAB>itemID``)."""
    with open(index, encoding="utf-8", errors="replace") as fh:
        first = fh.readline().strip()
    fields = first.replace(",", "\t").split("\t")
    return len(fields) >= 2 and not fields[-1].strip().lstrip("-").isdigit()


def read_index(index: Path, rows: int | None = None) -> list[str]:
    """Item id of each row from an index file: ``id<TAB|,>row`` lines (a header line is skipped) or one id per line.

    Raises:
        FeatureFileError: an empty index, a bad row number, a row out of range or given twice, an id
            listed twice (each names the file and the line).
    """
    text = index.read_text(encoding="utf-8", errors="strict").splitlines()
    lines = [(n, line.strip()) for n, line in enumerate(text, start=1) if line.strip()]
    if not lines:
        raise FeatureFileError(f"{index}: empty index")
    pairs = "\t" in lines[0][1] or "," in lines[0][1]
    if pairs and _has_header(index):
        lines = lines[1:]
        if not lines:
            raise FeatureFileError(f"{index}: a header line and no items")
    ids: dict[int, str] = {}
    seen: dict[str, int] = {}
    for k, (n, line) in enumerate(lines):
        if pairs:
            fields = line.replace(",", "\t").split("\t")
            item, raw_row = fields[0].strip(), fields[-1].strip()
            try:
                row = int(raw_row)
            except ValueError:
                raise FeatureFileError(f"{index}:{n}: row {raw_row!r} is not an integer") from None
        else:
            item, row = line, k
        if row < 0 or (rows is not None and row >= rows):
            raise FeatureFileError(f"{index}:{n}: row {row} of item {item!r} is outside 0..{(rows or 1) - 1}")
        if row in ids:
            raise FeatureFileError(f"{index}:{n}: row {row} is given to {ids[row]!r} and to {item!r}")
        if item in seen:
            raise FeatureFileError(f"{index}:{n}: item {item!r} is listed twice (also line {seen[item]})")
        ids[row], seen[item] = item, n
    if sorted(ids) != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))[:5]
        raise FeatureFileError(f"{index}: rows are not 0..{len(ids) - 1} (missing e.g. {missing})")
    return [ids[r] for r in range(len(ids))]


def _read_raw_float32(path: Path, rows: int) -> np.ndarray:
    size = path.stat().st_size
    if size == 0 or size % 4:
        raise FeatureFileError(f"{path}: {size} bytes is not a whole number of float32 values")
    values = size // 4
    if values % rows:
        raise FeatureFileError(f"{path}: {values} float32 values do not split into {rows} rows "
                               f"(the index lists {rows} items; width would be {values / rows:.2f})")
    return np.fromfile(path, dtype="<f4").reshape(rows, values // rows)


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        raise FeatureFileError(f"{path}: not a plain .npy array ({exc})") from exc
    if arr.ndim != 2:
        raise FeatureFileError(f"{path}: expected a 2-D array [rows, width], found shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise FeatureFileError(f"{path}: expected floats, found {arr.dtype}")
    return np.asarray(arr, dtype=np.float32)


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    missing = {"item_id", "embedding"} - set(table.column_names)
    if missing:
        raise FeatureFileError(f"{path}: missing column(s) {sorted(missing)} (found {table.column_names})")
    col = table.column("embedding").combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type)
            or pa.types.is_large_list(col.type)):
        raise FeatureFileError(f"{path}: column embedding is {col.type}, expected a list of floats")
    lengths = set(col.value_lengths().to_pylist()) if not pa.types.is_fixed_size_list(col.type) else \
        {col.type.list_size}
    if len(lengths) != 1:
        raise FeatureFileError(f"{path}: embeddings have different widths {sorted(lengths)[:5]}")
    dim = lengths.pop()
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    ids = [str(i) for i in table.column("item_id").to_pylist()]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise FeatureFileError(f"{path}: item_id listed more than once, e.g. {sorted(dupes)[:3]}")
    return ids, values.reshape(len(ids), dim)


def read_features(path: Path, index: Path | None, fmt: str = "auto") -> FeatureMatrix:
    """Read and check a precomputed feature file (see the module docstring for the formats).

    Raises:
        FeatureFileError: unreadable or inconsistent (width vs file size, index length vs rows), or a
            row with NaN or inf (the message names the row and its item).
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: not found")
    fmt = detect_format(path, index) if fmt == "auto" else fmt
    if fmt != "parquet" and index is None:
        raise FeatureFileError(f"{path}: format {fmt} needs an item index (the row -> item id file)")
    if fmt == "parquet":
        ids, emb = _read_parquet(path)
    elif fmt == "unisrec":
        ids = read_index(index)
        emb = _read_raw_float32(path, len(ids))
    elif fmt in ("npy", "mmrec"):
        emb = _read_npy(path)
        ids = read_index(index, rows=len(emb))
        if len(ids) != len(emb):
            raise FeatureFileError(f"{index}: {len(ids)} items for {len(emb)} rows of {path}")
    else:
        raise FeatureFileError(f"{path}: unknown format {fmt!r} (auto, unisrec, mmrec, npy, parquet)")
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise FeatureFileError(f"{path}: row {bad} (item {ids[bad]!r}) has NaN or inf values "
                               f"({int((~finite).sum())} such rows)")
    return FeatureMatrix(ids, np.ascontiguousarray(emb, dtype=np.float32), fmt, file_sha256(path),
                         file_sha256(index) if index is not None else None)


def import_features(name: str, modality: str, source: PrecomputedFeatures, paths: CatalogPaths,
                    file: Path, index: Path | None) -> StageSummary:
    """Write ``paths.<modality>_features`` from a precomputed file, aligned to the catalog's items.

    Catalog items the file does not list get no row (the model uses its learned missing vector);
    rows of items the catalog does not have are counted and left out.
    """
    started = time.perf_counter()
    store = paths.text_features if modality == "text" else paths.image_features
    # every item of the catalog: the image stage reads it from the images table, which it depends on
    listing = paths.items if modality == "text" else paths.images_table
    catalog_items = pq.read_table(listing, columns=["item_id"]).column("item_id").to_pylist()
    matrix = read_features(file, index, source.format)
    row_of = {item: r for r, item in enumerate(matrix.item_ids)}
    rows = [row_of[i] for i in catalog_items if i in row_of]
    kept = [i for i in catalog_items if i in row_of]
    emb = matrix.embeddings[rows] if rows else np.zeros((0, matrix.dim), np.float32)
    identity = {"modality": modality, "precomputed": True, "format": matrix.format, "source_sha256": matrix.sha256,
                "index_sha256": matrix.index_sha256, "provenance": source.provenance, "dim": matrix.dim}
    metadata = {IDENTITY_KEY: identity_json(identity), "precomputed": "true", "source_sha256": matrix.sha256,
                "format": matrix.format, "provenance": source.provenance, "source": source.file}
    previous = read_rows(store)
    unchanged = previous is not None and previous.metadata.get(IDENTITY_KEY) == metadata[IDENTITY_KEY] \
        and previous.item_ids == kept
    if len(kept):
        shas = [hashlib.sha256(row.tobytes()).hexdigest() for row in emb]
        if not unchanged:
            write_rows(store, FeatureRows(kept, shas, emb, metadata))
    else:
        store.unlink(missing_ok=True)  # nothing to import: the modality is absent for this catalog
    counts = {"imported": 0 if unchanged else len(kept), "reused": len(kept) if unchanged else 0,
              "absent": len(catalog_items) - len(kept), "extra_rows": len(matrix.item_ids) - len(kept),
              "total": len(catalog_items), "dim": matrix.dim, "format": matrix.format}
    notes = [f"precomputed {modality} features from {source.file} (sha256 {matrix.sha256[:12]}...)"
             + (f": {source.provenance}" if source.provenance else "")]
    if counts["absent"]:
        notes.append(f"{counts['absent']} catalog items are not in the file: they use the model's missing vector")
    summary = StageSummary(f"encode_{modality}", name, counts, time.perf_counter() - started, notes)
    summary.write(paths.summary(f"encode_{modality}"))
    return summary


def local_copy(url: str, paths: CatalogPaths) -> Path:
    """Where ingest stored the file fetched from ``url`` (``raw/<hash>-<name>``)."""
    path = paths.raw_file(url)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {url} has not been fetched; run `cammsr ingest` for this catalog first")
    return path


def import_from_raw(name: str, modality: str, source: PrecomputedFeatures, paths: CatalogPaths) -> StageSummary:
    """`import_features` on the copies ingest fetched into ``raw/``."""
    file = local_copy(source.file, paths)
    index = local_copy(source.index, paths) if source.index else None
    return import_features(name, modality, source, paths, file, index)


