"""The Parquet feature store: one row per item, upserted by content hash, resumable.

A store file (``features/text.parquet``, ``features/image.parquet``) holds
``item_id (str), content_sha256 (str), embedding (fixed_size_list<float32>[d])`` and, in the
schema metadata, the model identity plus the library versions that produced it.

`upsert` is the one write path. A run encodes only items that are new or whose content hash
changed, reuses rows whose ``(item_id, content_sha256)`` match, and drops rows of items that are
gone. A different model identity (name, revision, pooling, ...) rebuilds from scratch. Work is
done in chunks; each finished chunk lands as a part file in ``<store>.parts/``, so a run killed
halfway leaves the previous store untouched and the next run picks the finished chunks up.
At the end the parts are merged into the store in one atomic rename and deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cammsr.core.atomic import write_parquet_atomic

log = logging.getLogger(__name__)

IDENTITY_KEY = "identity"  # schema-metadata key holding the JSON of the model identity
DEFAULT_CHUNK_SIZE = 2048  # items per part file: small enough to lose little on a kill


@dataclass
class FeatureRows:
    """Rows of a store (or of one part file) in memory.

    Attributes:
        item_ids: one per row.
        shas: content_sha256 per row.
        embeddings: float32 [N, d].
        metadata: schema metadata, str -> str.
    """

    item_ids: list[str]
    shas: list[str]
    embeddings: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.item_ids)


def schema(dim: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The store schema for embeddings of width ``dim`` (>= 1)."""
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("content_sha256", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata=dict(metadata or {}),
    )


def to_table(rows: FeatureRows) -> pa.Table:
    """Arrow table of ``rows`` with the store schema; ``dim`` is also written to the metadata."""
    n, dim = rows.embeddings.shape
    if dim < 1:
        raise ValueError("feature store: embeddings need at least one dimension")
    if len(rows.item_ids) != n or len(rows.shas) != n:
        raise ValueError(f"feature store: {len(rows.item_ids)} ids, {len(rows.shas)} hashes, {n} embeddings")
    flat = pa.array(np.ascontiguousarray(rows.embeddings, dtype=np.float32).reshape(-1), pa.float32())
    embedding = pa.FixedSizeListArray.from_arrays(flat, dim)
    meta = {**rows.metadata, "dim": str(dim)}
    return pa.Table.from_arrays(
        [pa.array(rows.item_ids, pa.string()), pa.array(rows.shas, pa.string()), embedding],
        schema=schema(dim, meta),
    )


def write_rows(path: str | Path, rows: FeatureRows) -> None:
    """Write ``rows`` to ``path`` atomically (temp file + rename)."""
    write_parquet_atomic(path, to_table(rows))


def read_rows(path: str | Path) -> FeatureRows | None:
    """Read a store or part file; None when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    table = pq.read_table(path)
    missing = {"item_id", "content_sha256", "embedding"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a feature store, missing column(s) {sorted(missing)}")
    emb_type = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(emb_type):
        raise ValueError(f"{path}: column embedding is {emb_type}, expected fixed_size_list<float32>[d]")
    dim = emb_type.list_size
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return FeatureRows(
        item_ids=table.column("item_id").to_pylist(),
        shas=table.column("content_sha256").to_pylist(),
        embeddings=values.astype(np.float32, copy=False).reshape(len(table), dim),
        metadata=meta,
    )


def load_features(path: str | Path, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings aligned to ``item_ids``, with a presence mask.

    Args:
        path: the store file.
        item_ids: the item index to align to (e.g. the split's item order).

    Returns:
        features: float32 [N, d]; rows of items without features are zeros.
        present: bool [N]; False where the store has no row for the item.
        A missing or empty store gives ``(zeros [N, 0], all False)`` so a catalog without
        images still trains (the modality is simply absent).
    """
    n = len(item_ids)
    rows = read_rows(path)
    if rows is None or len(rows) == 0:
        log.warning(
            "%s: no features (%s); every item is marked absent", path, "missing" if rows is None else "empty"
        )
        return np.zeros((n, 0), np.float32), np.zeros(n, bool)
    row_of = {item_id: i for i, item_id in enumerate(rows.item_ids)}
    pos = np.fromiter((row_of.get(item_id, -1) for item_id in item_ids), dtype=np.int64, count=n)
    present = pos >= 0
    features = np.zeros((n, rows.dim), np.float32)
    features[present] = rows.embeddings[pos[present]]
    log.info("%s: %d of %d items have features (d=%d)", path, int(present.sum()), n, rows.dim)
    return features, present


def identity_json(identity: Mapping[str, object]) -> str:
    """Canonical JSON of a model identity; two stores are compatible iff these strings match."""
    return json.dumps(dict(identity), sort_keys=True, default=str)


def parts_dir(store: str | Path) -> Path:
    """``<store>.parts/``: where finished chunks of an unfinished run wait to be merged."""
    store = Path(store)
    return store.with_name(store.name + ".parts")


def read_parts(store: str | Path, identity: str) -> dict[tuple[str, str], np.ndarray]:
    """Rows of the finished chunks of an interrupted run, keyed by (item_id, content_sha256).

    Part files written under another model identity, or unreadable ones, are deleted.
    """
    folder = parts_dir(store)
    done: dict[tuple[str, str], np.ndarray] = {}
    for part in sorted(folder.glob("part-*.parquet")):
        try:
            rows = read_rows(part)
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("%s: unreadable part file, deleting it (%s)", part, exc)
            part.unlink()
            continue
        if rows is None:
            continue
        if rows.metadata.get(IDENTITY_KEY) != identity:
            log.info("%s: written by another model identity, deleting it", part)
            part.unlink()
            continue
        done.update(zip(zip(rows.item_ids, rows.shas, strict=True), rows.embeddings, strict=True))
    return done


def _part_numbers(folder: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")]


@dataclass
class EncodedChunk:
    """What an encoder returns for a chunk of positions (indices into the wanted item list).

    Attributes:
        positions: the positions that were encoded, in the order of ``embeddings``.
        embeddings: float32 [len(positions), d].
        failures: position -> reason, for items that could not be encoded (no row is written).
    """

    positions: list[int]
    embeddings: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartJob:
    """One chunk of work: the positions to encode and the part file their rows go to.

    Everything a remote worker needs to write the part is here (ids, hashes, identity), so a
    job can be shipped to another process as is; only the encoder's input travels beside it.
    """

    part: Path
    positions: list[int]
    item_ids: list[str]
    shas: list[str]
    identity: str  # identity JSON, written into the part's metadata

    def write(self, chunk: EncodedChunk) -> int:
        """Write the rows of ``chunk`` (positions among ``self.positions``); -> rows written."""
        if not chunk.positions:
            return 0
        index = {pos: i for i, pos in enumerate(self.positions)}
        rows = [index[pos] for pos in chunk.positions]
        write_rows(
            self.part,
            FeatureRows(
                item_ids=[self.item_ids[i] for i in rows],
                shas=[self.shas[i] for i in rows],
                embeddings=np.asarray(chunk.embeddings, np.float32),
                metadata={IDENTITY_KEY: self.identity},
            ),
        )
        return len(rows)


def plan_parts(
    store: str | Path,
    item_ids: Sequence[str],
    shas: Sequence[str],
    todo: Sequence[int],
    identity: str,
    chunk_size: int,
) -> list[PartJob]:
    """Cut ``todo`` (ascending positions) into contiguous chunks, each with a fresh part file.

    Part numbers continue after those already in the folder, so the parts of an interrupted
    run are never overwritten and parallel workers never write the same file.
    """
    folder = parts_dir(store)
    first = max(_part_numbers(folder), default=-1) + 1 if folder.exists() else 0
    jobs = []
    for k, begin in enumerate(range(0, len(todo), chunk_size)):
        positions = list(todo[begin : begin + chunk_size])
        jobs.append(
            PartJob(
                part=folder / f"part-{first + k:05d}.parquet",
                positions=positions,
                item_ids=[item_ids[p] for p in positions],
                shas=[shas[p] for p in positions],
                identity=identity,
            )
        )
    return jobs


# encode(positions, progress) -> EncodedChunk; progress(n) advances the bar by n items.
ChunkEncoder = Callable[[Sequence[int], Callable[[int], None]], EncodedChunk]
# run_parts(jobs, progress) -> {position: failure reason}. When it returns, every job's encoded
# rows are in its part file (a job whose items all failed may have none). Any executor fits:
# this process (`local_parts_runner`), or Dask workers (`features.distributed`).
PartRunner = Callable[[Sequence[PartJob], Callable[[int], None]], dict[int, str]]


def local_parts_runner(encode: ChunkEncoder) -> PartRunner:
    """Run the jobs one after another in this process with ``encode``."""

    def run(jobs: Sequence[PartJob], progress: Callable[[int], None]) -> dict[int, str]:
        failures: dict[int, str] = {}
        for job in jobs:
            chunk = encode(job.positions, progress)
            failures.update(chunk.failures)
            job.write(chunk)
        return failures

    return run


@dataclass
class UpsertReport:
    """Counts of one `upsert` run (the stage summary is built from these)."""

    encoded: int = 0  # encoded in this run
    reused: int = 0  # taken from the previous store unchanged
    resumed: int = 0  # taken from part files of an interrupted run
    removed: int = 0  # rows of the previous store whose item has no row any more
    failures: dict[str, str] = field(default_factory=dict)  # item_id -> reason
    total: int = 0  # rows in the store after the run
    dim: int = 0
    rebuilt: bool = False  # the previous store had another model identity
    encode_seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0


def upsert(
    path: str | Path,
    item_ids: Sequence[str],
    shas: Sequence[str],
    identity: Mapping[str, object],
    encode: ChunkEncoder | None = None,
    *,
    run_parts: PartRunner | None = None,
    parallelism: int = 1,
    info: Mapping[str, str] | None = None,
    empty_dim: Callable[[], int] | None = None,
    warm_up: Callable[[], object] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    desc: str = "encode",
) -> UpsertReport:
    """Bring the store at ``path`` up to date with the wanted ``(item_id, sha)`` rows.

    Args:
        path: the store file.
        item_ids, shas: the wanted rows, in the order the store will be written.
        identity: what makes embeddings comparable (model name, revision, pooling, ...); a
            change rebuilds the store. Also written to the metadata, one key per entry.
        encode: encodes a chunk of positions into ``item_ids``; called once per chunk, here.
        run_parts: instead of ``encode``, an executor for all the chunks at once (e.g. Dask
            workers that each write their own part files); exactly one of the two is given.
        parallelism: the chunks are made small enough that there are at least this many.
        info: extra metadata that does not invalidate rows (library versions, dtype).
        empty_dim: gives the embedding width when the store ends up with no rows.
        warm_up: called once before encoding when there is work (e.g. loading the model), so
            the reported items/s is the encoding rate alone.
        chunk_size: items per chunk (and per part file), at most.
        desc: progress-bar label.
    """
    path = Path(path)
    if (encode is None) == (run_parts is None):
        raise TypeError("upsert: give exactly one of encode= and run_parts=")
    if len(item_ids) != len(shas):
        raise ValueError(f"upsert {path}: {len(item_ids)} item ids but {len(shas)} hashes")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError(f"upsert {path}: duplicate item ids in the wanted rows")
    ident = identity_json(identity)
    report = UpsertReport()

    old = read_rows(path)
    reusable: dict[tuple[str, str], np.ndarray] = {}
    if old is not None and old.metadata.get(IDENTITY_KEY) == ident:
        reusable = dict(zip(zip(old.item_ids, old.shas, strict=True), old.embeddings, strict=True))
    elif old is not None:
        report.rebuilt = True
        log.warning(
            "%s: model identity changed, rebuilding the store from scratch\n  was: %s\n  now: %s",
            path,
            old.metadata.get(IDENTITY_KEY),
            ident,
        )
    resumable = read_parts(path, ident)

    rows: dict[int, np.ndarray] = {}
    todo: list[int] = []
    for pos, key in enumerate(zip(item_ids, shas, strict=True)):
        if key in reusable:
            rows[pos] = reusable[key]
            report.reused += 1
        elif key in resumable:
            rows[pos] = resumable[key]
            report.resumed += 1
        else:
            todo.append(pos)
    del reusable, resumable
    if report.resumed:
        log.info("%s: resuming an interrupted run, %d rows already encoded", path, report.resumed)

    chunk = _chunk_size(len(todo), chunk_size, parallelism)
    jobs = plan_parts(path, item_ids, shas, todo, ident, chunk)
    if todo and warm_up is not None:
        warm_up()
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=desc, unit="item", mininterval=1.0, disable=not todo) as bar:
        failures = (run_parts or local_parts_runner(encode))(jobs, bar.update)
    report.encode_seconds = time.perf_counter() - start
    report.encoded = _collect_parts(path, jobs, failures, rows)
    report.failures = {item_ids[pos]: reason for pos, reason in sorted(failures.items())}

    order = sorted(rows)
    if order:
        embeddings = np.stack([rows[p] for p in order]).astype(np.float32, copy=False)
    else:
        dim = old.dim if old is not None and not report.rebuilt else (empty_dim() if empty_dim else 0)
        if dim < 1:
            raise ValueError(f"upsert {path}: no rows and no embedding width to write an empty store with")
        embeddings = np.zeros((0, dim), np.float32)
    metadata = {
        **{k: "" if v is None else str(v) for k, v in identity.items()},
        **dict(info or {}),
        IDENTITY_KEY: ident,
    }
    final = FeatureRows([item_ids[p] for p in order], [shas[p] for p in order], embeddings, metadata)
    write_rows(path, final)
    shutil.rmtree(parts_dir(path), ignore_errors=True)

    report.total, report.dim = len(final), final.dim
    if old is not None:
        report.removed = len(set(old.item_ids) - set(final.item_ids))
    return report


def _chunk_size(todo: int, chunk_size: int, parallelism: int) -> int:
    """``chunk_size``, or for parallel runs the even split into a multiple of ``parallelism`` chunks
    of at most ``chunk_size`` (5000 items, 2048, 2 workers -> 4 chunks of 1250, not 2048+2048+904)."""
    if parallelism <= 1 or todo == 0:
        return chunk_size
    n_chunks = -(-todo // chunk_size)
    n_chunks = -(-n_chunks // parallelism) * parallelism
    return max(1, -(-todo // n_chunks))


def _collect_parts(
    path: Path, jobs: Sequence[PartJob], failures: Mapping[int, str], rows: dict[int, np.ndarray]
) -> int:
    """Read this run's part files into ``rows``; -> rows added.

    Every position of every job must come back as a row or a failure: anything else means an
    executor lost work, and the store is not written (the parts stay for the next run).
    """
    added = 0
    for job in jobs:
        part = read_rows(job.part)
        found = {} if part is None else dict(zip(part.item_ids, part.embeddings, strict=True))
        for pos, item_id in zip(job.positions, job.item_ids, strict=True):
            if item_id in found:
                rows[pos] = found[item_id]
                added += 1
            elif pos not in failures:
                raise RuntimeError(
                    f"upsert {path}: item {item_id!r} came back neither encoded nor failed "
                    f"(part {job.part.name}); the finished parts are kept for the next run"
                )
    return added
