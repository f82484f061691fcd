"""Ingest scaling: MB/s and peak RSS of `cammsr.ingest.stage.run_ingest` as a raw catalog grows 1x, 4x, 16x.

    python -m benchmarks.ingest [--scales 1,4,16] [--base-users 8000] [--out-dir data/bench/ingest]

A synthetic Amazon-2018 catalog (gzipped JSON lines: reviews with review text, metadata with title,
description, categories, image URL) is written at each scale; each scale is ingested with images off
in its own process, so its peak RSS is its own. A streaming parser shows throughput flat or rising
with size and peak memory flat: the raw file is never held in memory (only the normalized
interactions, a few dozen bytes a row, grow with it). Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_ingest")
WORDS = [
    "soft", "plush", "wooden", "puzzle", "colourful", "educational", "durable", "classic", "deluxe", "mini",
    "travel", "kit", "set", "bright", "musical", "magnetic", "stacking", "building", "blocks", "figure", "doll",
    "vehicle", "train", "track", "board", "game",
]


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def write_catalog(folder: Path, scale: int, base_users: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``reviews.json.gz`` and ``meta.json.gz`` with ``base_users * scale`` users (Amazon 2018 keys)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_users, n_items = base_users * scale, base_users * scale // 2
    reviews, meta = folder / "reviews.json.gz", folder / "meta.json.gz"
    with gzip.open(reviews, "wt", compresslevel=1) as fh:
        for u in range(n_users):
            length = 5 + rng.poisson(4)
            items = rng.integers(0, n_items, length)
            t0 = 1_300_000_000 + int(rng.integers(0, 10**8))
            for k, i in enumerate(items):
                fh.write(json.dumps({
                    "overall": float(rng.integers(1, 6)), "vote": str(rng.integers(0, 9)), "verified": True,
                    "reviewTime": "01 1, 2014", "reviewerID": f"U{u:09d}", "asin": f"B{i:09d}",
                    "style": {"Color:": " Blue"}, "reviewerName": "A. Reader",
                    "reviewText": _sentence(rng, 40), "summary": _sentence(rng, 5),
                    "unixReviewTime": t0 + 86400 * k}) + "\n")
    with gzip.open(meta, "wt", compresslevel=1) as fh:
        for i in range(n_items):
            fh.write(json.dumps({
                "asin": f"B{i:09d}", "title": _sentence(rng, 6), "brand": "Acme",
                "category": ["Toys & Games", f"Cat{i % 30}", f"Sub{i % 200}"],
                "description": [_sentence(rng, 30)], "main_cat": "Toys & Games", "price": "$9.99",
                "imageURLHighRes": [f"https://images.example/{i}.jpg"]}) + "\n")
    return reviews, meta


def ingest_once(folder: Path) -> dict:
    """Ingest the catalog in ``folder`` (images off) in this process; return timings and peak RSS."""
    from cammsr.core.config import CatalogParams, IngestParams
    from cammsr.core.paths import CatalogPaths
    from cammsr.ingest.stage import run_ingest

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reviews, meta = folder / "reviews.json.gz", folder / "meta.json.gz"
    catalog = CatalogParams(reviews=reviews.resolve().as_uri(), meta=meta.resolve().as_uri(), images=False)
    paths = CatalogPaths.of("bench", folder / "data")
    t0 = time.perf_counter()
    summary = run_ingest("bench", catalog, IngestParams(), paths)
    seconds = time.perf_counter() - t0
    raw = sum(_gunzipped_size(p) for p in (reviews, meta))
    return {"seconds": seconds, "raw_mb": raw / 1e6, "gz_mb": (reviews.stat().st_size + meta.stat().st_size) / 1e6,
            "lines": summary.counts["reviews_lines"] + summary.counts["meta_lines"],
            "interactions": summary.counts["interactions"], "rss_after_imports_mb": rss0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _gunzipped_size(path: Path) -> int:
    with gzip.open(path, "rb") as fh:
        return sum(len(chunk) for chunk in iter(lambda: fh.read(1 << 20), b""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--base-users", type=int, default=8000, help="users at scale 1 (about 9 reviews each)")
    ap.add_argument("--out-dir", type=Path, default=Path("data/bench/ingest"))
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.worker is not None:  # one measurement, in its own process
        print(json.dumps(ingest_once(args.worker)))
        return

    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        folder = args.out_dir / f"x{scale}"
        if not (folder / "meta.json.gz").exists():
            write_catalog(folder, scale, args.base_users)
        out = subprocess.run([sys.executable, "-m", "benchmarks.ingest", "--worker", str(folder)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1]) | {"scale": scale}
        r["mb_per_s"] = r["raw_mb"] / r["seconds"]
        r["lines_per_s"] = r["lines"] / r["seconds"]
        rows.append(r)
        print(f"x{scale:<3} {r['lines']:>9} lines  {r['raw_mb']:8.1f} MB raw ({r['gz_mb']:6.1f} gz)  "
              f"{r['seconds']:7.1f} s  {r['mb_per_s']:6.1f} MB/s  {r['lines_per_s']:8.0f} lines/s  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB (after imports {r['rss_after_imports_mb']:.0f})", flush=True)
    first, last = rows[0], rows[-1]
    print(json.dumps({
        "scales": [r["scale"] for r in rows], "mb_per_s": [round(r["mb_per_s"], 2) for r in rows],
        "peak_rss_mb": [round(r["peak_rss_mb"]) for r in rows],
        "throughput_last_over_first": round(last["mb_per_s"] / first["mb_per_s"], 2),
        "peak_rss_last_over_first": round(last["peak_rss_mb"] / first["peak_rss_mb"], 2),
        "raw_mb_last_over_first": round(last["raw_mb"] / first["raw_mb"], 2),
    }))


if __name__ == "__main__":
    main()
