"""Feature-store benchmarks: pipeline overhead and incremental refresh, for text and images.

    python -m benchmarks.features            # 5,000 items: text (MiniLM) and images (ViT-B-32)
    python -m benchmarks.features --quick    # 300 items, a smoke test of the whole benchmark

On a synthetic catalog drawn with the demo's vocabulary and image drawer (JPEG product images,
``--image-size`` pixels a side), on the CPU unless ``--device`` says otherwise:

- ``*_pipeline_vs_forward``: items/s of the whole stage call (`encode_text` / `encode_image`:
  read Parquet, render and hash, load the model, tokenize or decode, batch, forward, pool, write
  the store) divided by items/s of the bare model forward on the same pre-tokenized /
  pre-processed batches. Higher is better; 1.0 means no overhead (target >= 0.9). The forward is
  clocked by hooks on the model (the BERT module; CLIP's vision tower) *during* the stage call:
  the very batches the stage builds, at the very moment, so other processes on a shared machine
  slow both sides alike. As a cross-check, ``*_separate_forward_items_per_s`` times the bare
  forward in a loop of its own on ``--{text,image}-forward-share`` of the same batches, half
  before and half after the stage call; on a busy machine that ratio swings by +-30%.
- ``*_refresh_vs_full``: wall time of the stage after 1% of the items changed (titles for text,
  image files for images; the median of ``--refreshes`` runs, each after a fresh change) divided
  by that of the full encode. Lower is better (target <= 0.05); ``refresh_vs_full`` is the worse
  of the two.

Prints a table, then one JSON line with every number (the last line of stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table

from cammsr.core.config import ImageFeatureParams, TextFeatureParams
from cammsr.core.device import torch_threads
from cammsr.core.paths import CatalogPaths
from demo.images import draw_item_image, encode_image
from demo.records import item_text
from demo.sequences import make_items
from features.encode import encode_image as encode_image_stage
from features.encode import encode_text
from features.image import ImageEncoder, ImageFiles, ImageJob, collate
from features.store import DEFAULT_CHUNK_SIZE
from features.text import TEMPLATE_FIELDS, TextEncoder, TextTemplate

log = logging.getLogger("benchmarks.features")
N_CATEGORIES = 6
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("brand", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("category", pa.string()),
        ("image_url", pa.string()),
    ]
)
IMAGES_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("path", pa.string()), ("sha256", pa.string()), ("status", pa.string())]
)


# ---- the catalog -------------------------------------------------------------------------------


def build_catalog(root: Path, n_items: int, image_size: int, seed: int) -> CatalogPaths:
    """items.parquet, images.parquet and images/*.jpg as ingest would leave them."""
    paths = CatalogPaths.of("bench", root)
    paths.images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items, images = [], []
    for spec in make_items(rng, n_items, N_CATEGORIES):
        text = item_text(spec, N_CATEGORIES, rng)
        rel = f"images/{spec.asin}.jpg"
        data = encode_image(draw_item_image(spec.category, spec.style, N_CATEGORIES, image_size, rng), "jpg")
        (paths.root / rel).write_bytes(data)
        path = text.categories[0]
        items.append(
            {"item_id": spec.asin, "title": text.title, "description": text.description, "brand": text.brand,
             "categories": path, "category": path[1], "image_url": rel}
        )  # fmt: skip
        images.append({"item_id": spec.asin, "path": rel, "sha256": _sha(data), "status": "ok"})
    pq.write_table(pa.Table.from_pylist(items, schema=ITEMS_SCHEMA), paths.items)
    pq.write_table(pa.Table.from_pylist(images, schema=IMAGES_SCHEMA), paths.images_table)
    return paths


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def change_titles(paths: CatalogPaths, k: int, rng: np.random.Generator) -> None:
    """Edit the titles of ``k`` random items, like a daily catalog update."""
    table = pq.read_table(paths.items).to_pylist()
    for i in rng.choice(len(table), size=k, replace=False):
        table[i]["title"] = f"{table[i]['title']} (new edition)"
    pq.write_table(pa.Table.from_pylist(table, schema=ITEMS_SCHEMA), paths.items)


def change_images(paths: CatalogPaths, k: int, rng: np.random.Generator, image_size: int) -> None:
    """Replace the image files of ``k`` random items and record their new hashes."""
    table = pq.read_table(paths.images_table).to_pylist()
    for i in rng.choice(len(table), size=k, replace=False):
        data = encode_image(draw_item_image(int(i) % N_CATEGORIES, 1, N_CATEGORIES, image_size, rng), "jpg")
        (paths.root / table[i]["path"]).write_bytes(data)
        table[i]["sha256"] = _sha(data)
    pq.write_table(pa.Table.from_pylist(table, schema=IMAGES_SCHEMA), paths.images_table)


# ---- bare forward ------------------------------------------------------------------------------


def _split(n_batches: int, share: float) -> tuple[list[int], list[int]]:
    """Batches to time, spread evenly: (first half, second half) by position."""
    stride = max(1, round(1 / share))
    picked = list(range(0, n_batches, stride))
    return picked[::2], picked[1::2]


class TextForward:
    """MiniLM forward alone on the stage's own batches: per chunk, length-sorted, padded (untimed)."""

    def __init__(self, params: TextFeatureParams, texts: Sequence[str], device: torch.device, chunk_size: int):
        self.encoder = TextEncoder(params, device)
        self.batches = [
            batch
            for begin in range(0, len(texts), chunk_size)
            for _, batch in self.encoder.batches(texts[begin : begin + chunk_size])
        ]

    def seconds(self, which: Sequence[int]) -> tuple[float, int]:
        """-> (seconds in the forward, items) over the batches ``which``."""
        spent, items = 0.0, 0
        with torch.inference_mode():
            for b in which:
                batch = {k: v.to(self.encoder.device) for k, v in self.batches[b].items()}
                start = time.perf_counter()
                self.encoder.model(**batch).last_hidden_state.cpu()
                spent += time.perf_counter() - start
                items += len(batch["input_ids"])
        return spent, items


class ImageForward:
    """ViT forward alone on the stage's batches, decoded and pre-processed untimed."""

    def __init__(self, params: ImageFeatureParams, paths: CatalogPaths, device: torch.device):
        self.encoder = ImageEncoder(params, device, 40_000_000)
        table = pq.read_table(paths.images_table).to_pylist()
        self.jobs = [ImageJob(i, paths.root / row["path"], row["sha256"]) for i, row in enumerate(table)]
        self.files = ImageFiles(self.jobs, self.encoder.preprocess, 40_000_000, self.encoder.min_side)
        self.bs = params.batch_size  # the stage batches consecutive images: the same batches when
        self.n_batches = -(-len(self.jobs) // self.bs)  # the batch size divides the chunk size

    def seconds(self, which: Sequence[int]) -> tuple[float, int]:
        spent, items = 0.0, 0
        with torch.inference_mode():
            for b in which:
                rows = range(b * self.bs, min((b + 1) * self.bs, len(self.jobs)))
                with torch_threads(1):  # as the stage decodes (untimed here)
                    _, pixels, failed = collate([self.files[i] for i in rows])
                assert not failed and pixels is not None, failed
                x = pixels.to(self.encoder.device)
                start = time.perf_counter()
                self.encoder.model.encode_image(x).cpu()
                spent += time.perf_counter() - start
                items += len(x)
        return spent, items


class ForwardClock:
    """Seconds inside the model's forward, by forward hooks on the module that does the math."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.items, self._start = device, 0.0, 0, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._sync()
        self._start = time.perf_counter()

    def post(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start
        first = args[0] if args else kwargs.get("input_ids", next(iter(kwargs.values())))
        self.items += len(first)

    @contextlib.contextmanager
    def on_models_built_by(self, cls: type, module_of: Callable[[object], torch.nn.Module]) -> Iterator[None]:
        """Hook the model of every ``cls`` instance built inside the block (after its __init__)."""
        real_init = cls.__init__

        def init(encoder, *args, **kwargs):
            real_init(encoder, *args, **kwargs)
            module = module_of(encoder)
            module.register_forward_pre_hook(self.pre, with_kwargs=True)
            module.register_forward_hook(self.post, with_kwargs=True)

        cls.__init__ = init
        try:
            yield
        finally:
            cls.__init__ = real_init


# ---- one modality ------------------------------------------------------------------------------


def run_modality(kind: str, paths: CatalogPaths, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """Separate forward (half) -> full stage, forward clocked -> separate forward (half) -> change 1%
    -> refresh stage."""
    device = torch.device(args.device)
    n = args.items
    if kind == "text":
        params = TextFeatureParams(batch_size=args.text_batch)
        template = TextTemplate(params.template)
        cols = pq.read_table(paths.items, columns=list(TEMPLATE_FIELDS)).to_pylist()
        forward = TextForward(params, [template.render(c) for c in cols], device, args.chunk_size)
        n_batches, share = len(forward.batches), args.text_forward_share
        encoder_cls, model_of = TextEncoder, lambda enc: enc.model

        def stage():
            return encode_text("bench", params, paths, device=args.device, chunk_size=args.chunk_size)
    else:
        params = ImageFeatureParams(batch_size=args.image_batch, num_workers=args.image_workers)
        forward = ImageForward(params, paths, device)
        n_batches, share = forward.n_batches, args.image_forward_share
        encoder_cls, model_of = ImageEncoder, lambda enc: enc.model.visual  # encode_image = visual(x)

        def stage():
            return encode_image_stage("bench", params, paths, device=args.device, chunk_size=args.chunk_size)

    before, after = _split(n_batches, share)
    s1, i1 = forward.seconds(before)
    clock = ForwardClock(device)
    with clock.on_models_built_by(encoder_cls, model_of):
        start = time.perf_counter()
        full = stage()
        full_s = time.perf_counter() - start
    if clock.items != n:
        raise RuntimeError(f"{kind}: the forward clock saw {clock.items} items, expected {n}")
    if full.counts["encoded"] != n:
        raise RuntimeError(f"{kind}: full encode wrote {full.counts['encoded']} rows, expected {n}")
    s2, i2 = forward.seconds(after)
    separate_rate = (i1 + i2) / (s1 + s2)
    del forward

    changed = max(1, round(n * args.changed))
    refreshes = []
    for _ in range(args.refreshes):  # each after a fresh 1% changed; the median is reported
        if kind == "text":
            change_titles(paths, changed, rng)
        else:
            change_images(paths, changed, rng, args.image_size)
        start = time.perf_counter()
        refresh = stage()
        refreshes.append(time.perf_counter() - start)
        if (refresh.counts["encoded"], refresh.counts["reused"]) != (changed, n - changed):
            raise RuntimeError(f"{kind}: refresh counts {refresh.counts}, expected {changed} encoded")
    refresh_s = float(np.median(refreshes))
    return {
        "items": n,
        "full_s": full_s,
        "pipeline_items_per_s": n / full_s,
        "encode_loop_items_per_s": full.counts["items_per_s"],
        "forward_items_per_s": clock.items / clock.seconds,
        "forward_s": clock.seconds,
        "pipeline_vs_forward": (n / full_s) / (clock.items / clock.seconds),
        "separate_forward_items_per_s": separate_rate,
        "separate_forward_items_timed": i1 + i2,
        "pipeline_vs_separate_forward": (n / full_s) / separate_rate,
        "changed": changed,
        "refresh_s": refresh_s,
        "refresh_runs_s": [round(r, 3) for r in refreshes],
        "refresh_vs_full": refresh_s / full_s,
    }


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=5000, help="catalog size (default 5000)")
    ap.add_argument("--quick", action="store_true", help="300 items: a smoke test, not a measurement")
    ap.add_argument("--image-size", type=int, default=500, help="JPEG side in pixels (Amazon imUrl: ~500)")
    ap.add_argument("--changed", type=float, default=0.01, help="share of items changed before each refresh")
    ap.add_argument("--refreshes", type=int, default=3, help="refresh runs (each after a fresh change); median")
    ap.add_argument("--text-batch", type=int, default=64)
    ap.add_argument("--image-batch", type=int, default=32)
    ap.add_argument("--image-workers", type=int, default=ImageFeatureParams().num_workers,
                    help="DataLoader workers decoding images (default: the params default)")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="items per part file")
    ap.add_argument("--text-forward-share", type=float, default=0.5, help="share of text batches timed bare")
    ap.add_argument("--image-forward-share", type=float, default=0.1, help="share of image batches timed bare")
    ap.add_argument("--only", choices=["text", "image"], help="run one modality")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, help="keep the catalog and stores here (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.items = min(args.items, 300)
    if args.items < 100:
        ap.error("--items: at least 100, so that 1% is at least one item")
    if args.chunk_size % args.image_batch:
        ap.error("--chunk-size must be a multiple of --image-batch (the bare forward reuses the stage's batches)")
    return args


def table(results: dict[str, dict], args: argparse.Namespace, wall_s: float) -> Table:
    t = Table(title=f"feature stores: {args.items} items, {args.device}, {torch.get_num_threads()} torch threads, "
                    f"{wall_s / 60:.1f} min")  # fmt: skip
    columns = ("modality", "stage items/s", "forward items/s", "pipeline / forward",
               "separate fwd items/s", "pipeline / separate", "full s",
               f"refresh s ({args.changed:.0%}): median (runs)", "refresh / full")  # fmt: skip
    for col in columns:
        t.add_column(col, justify="right")
    for kind, r in results.items():
        t.add_row(
            kind, f"{r['pipeline_items_per_s']:.1f}", f"{r['forward_items_per_s']:.1f}",
            f"{r['pipeline_vs_forward']:.3f}", f"{r['separate_forward_items_per_s']:.1f}",
            f"{r['pipeline_vs_separate_forward']:.3f}", f"{r['full_s']:.1f}",
            f"{r['refresh_s']:.2f} ({', '.join(f'{x:.2f}' for x in r['refresh_runs_s'])})",
            f"{r['refresh_vs_full']:.4f}",
        )  # fmt: skip
    return t


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cammsr.core.summary").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip  # noqa: F401  (imports are a per-process cost: paid before any timing)
    import transformers  # noqa: F401

    started, load_before = time.perf_counter(), os.getloadavg()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        paths = build_catalog(root, args.items, args.image_size, args.seed)
        log.warning("catalog of %d items built in %.1f s under %s", args.items, time.perf_counter() - t0, root)
        results = {kind: run_modality(kind, paths, args, rng) for kind in ("text", "image")
                   if args.only in (None, kind)}  # fmt: skip
    wall_s = time.perf_counter() - started
    Console(width=160).print(table(results, args, wall_s))
    summary: dict = {f"{kind}_{key}": value for kind, r in results.items() for key, value in r.items()}
    ratios = [r["refresh_vs_full"] for r in results.values()]
    summary = {
        **{f"{kind}_pipeline_vs_forward": round(r["pipeline_vs_forward"], 4) for kind, r in results.items()},
        "refresh_vs_full": round(max(ratios), 4),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()},
        "items": args.items, "image_size": args.image_size, "device": args.device, "quick": args.quick,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "wall_s": round(wall_s, 1),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
