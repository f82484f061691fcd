"""Generate the bundled demo catalog: Amazon-2018-style reviews, metadata and product images.

    python -m demo.generate --out data/sources/demo [--params params.yaml]

Writes into ``out_dir``::

    reviews_Demo_5.json.gz   JSON lines: reviewerID, asin, overall, unixReviewTime, reviewTime, ...
    meta_Demo.json.gz        JSON lines: asin, title, description, brand, categories, price, imUrl, ...
    images/<asin>.jpg|png    product images (every third item PNG)
    demo_summary.json        counts and the planted defects (no timings, so the folder is reproducible)

Deterministic: the same `DemoParams` give byte-identical files. The behaviour behind the data lives in
``demo.sequences`` (planted sequential signal), the looks in ``demo.images`` and ``demo.records``.
Exactly one of each defect real catalogs have is planted, and recorded in the returned `DemoSummary`:
a truncated JSON line, a reviewed item without metadata, a missing image, a corrupt image and a
duplicated review.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cammsr.core.config import DemoParams, load_params
from cammsr.core.summary import StageSummary
from demo.images import draw_item_image, encode_image, truncate_jpeg
from demo.records import item_text, meta_line, review_line
from demo.sequences import ItemSpec, UserSpec, make_items, make_users

log = logging.getLogger(__name__)

REVIEWS_FILE = "reviews_Demo_5.json.gz"
META_FILE = "meta_Demo.json.gz"
IMAGES_DIR = "images"
SUMMARY_FILE = "demo_summary.json"


@dataclass
class DemoSummary:
    """What `generate_demo` wrote, and where each planted defect is (line numbers are 1-based)."""

    out_dir: str
    n_users: int
    n_items: int
    n_categories: int
    n_reviews: int  # distinct valid reviews (interactions)
    n_review_lines: int  # lines in the reviews file: reviews + the duplicate + the malformed line
    n_meta_lines: int
    n_images: int  # image files written, the corrupt one included
    n_png: int
    malformed_line: int
    duplicate_line: int
    duplicate_of_line: int
    duplicate_user: str
    duplicate_item: str
    missing_meta_item: str
    missing_image_item: str
    corrupt_image_item: str
    same_group_fraction: float  # consecutive pairs of a user sharing category and style
    same_group_chance: float  # the same fraction if items were drawn by popularity alone
    late_items: int = 0  # launched late: reviewed only as a user's last or second-to-last item
    late_test_targets: int = 0  # users whose last review is of a late item
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"demo: users={self.n_users} items={self.n_items} reviews={self.n_reviews} "
            f"lines={self.n_review_lines} images={self.n_images} same_group={self.same_group_fraction:.3f} "
            f"(chance {self.same_group_chance:.3f}) late_items={self.late_items} "
            f"late_test_targets={self.late_test_targets} -> {self.out_dir} ({self.seconds:.1f} s)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_stage_summary(self, catalog: str = "demo") -> StageSummary:
        """The summary every driver prints; counts first, the planted defects as notes."""
        counts = {
            k: getattr(self, k)
            for k in ("n_users", "n_items", "n_reviews", "n_review_lines", "n_meta_lines", "n_images")
        }
        notes = [
            f"malformed JSON at {REVIEWS_FILE}:{self.malformed_line}",
            f"duplicate review at line {self.duplicate_line} (copy of line {self.duplicate_of_line})",
            f"no metadata for item {self.missing_meta_item}",
            f"missing image for item {self.missing_image_item}",
            f"corrupt image for item {self.corrupt_image_item}",
        ]
        return StageSummary("demo", catalog, counts, self.seconds, notes)


def gzip_bytes(text: str) -> bytes:
    """Gzip ``text`` with no file name and mtime 0 in the header, so equal text gives equal bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    return buf.getvalue()


def image_url(relative: str, image_base_url: str | None) -> str:
    """``images/<file>`` as written (resolved by ingest against the meta URL), or absolute under a base."""
    if image_base_url is None:
        return relative
    return image_base_url.rstrip("/") + "/" + relative


def _pick_defect_items(rng: np.random.Generator, items: list[ItemSpec], users: list[UserSpec]) -> list[int]:
    """Three distinct well-reviewed items (upper half by count), so they survive a 5-core downstream."""
    counts = Counter(item for user in users for item, _ in user.events)
    ranked = sorted(range(len(items)), key=lambda i: (-counts[i], i))
    upper = ranked[: max(3, len(ranked) // 2)]
    return [upper[int(i)] for i in rng.choice(len(upper), size=3, replace=False)]


def _same_group_stats(items: list[ItemSpec], users: list[UserSpec]) -> tuple[float, float]:
    """Fraction of consecutive pairs sharing (category, style), and what popularity alone would give."""
    groups = [[(items[i].category, items[i].style) for i, _ in u.events] for u in users]
    pairs = [(a, b) for g in groups for a, b in zip(g, g[1:], strict=False)]
    same = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    shares = Counter(x for g in groups for x in g)
    total = sum(shares.values())
    chance = sum((n / total) ** 2 for n in shares.values())
    return same, chance


def _review_lines(
    rng: np.random.Generator, items: list[ItemSpec], users: list[UserSpec], n_categories: int
) -> list[str]:
    """All reviews in one chronological dump; same-day reviews keep each user's sequence order."""
    keyed = []
    for u_index, user in enumerate(users):
        for pos, (item, day) in enumerate(user.events):
            line = review_line(user, items[item], day, n_categories, rng)
            keyed.append(((day, u_index, pos), line))
    keyed.sort(key=lambda kv: kv[0])
    return [line for _, line in keyed]


def _plant_line_defects(rng: np.random.Generator, lines: list[str]) -> tuple[list[str], dict[str, int]]:
    """Insert one exact duplicate (right after its original) and one truncated line mid-file."""
    dup_of = int(rng.integers(0, len(lines)))
    tagged: list[tuple[str, str]] = [("ok", line) for line in lines]
    tagged[dup_of] = ("original", lines[dup_of])
    tagged.insert(dup_of + 1, ("duplicate", lines[dup_of]))
    at = int(rng.integers(len(tagged) // 3, 2 * len(tagged) // 3 + 1))
    victim = tagged[at][1]  # a writer that died mid-line, then wrote the line again in full
    tagged.insert(at, ("malformed", victim[: len(victim) // 2]))
    where = {tag: n for n, (tag, _) in enumerate(tagged, start=1) if tag != "ok"}
    return [line for _, line in tagged], {
        "malformed_line": where["malformed"],
        "duplicate_line": where["duplicate"],
        "duplicate_of_line": where["original"],
    }


def _write_catalog(out: Path, params: DemoParams, image_base_url: str | None) -> DemoSummary:
    """Generate everything into ``out`` (an empty folder); see `generate_demo`."""
    seeds = np.random.SeedSequence(params.seed).spawn(5)  # one stream per concern: edits stay local
    rng_items, rng_users, rng_text, rng_images, rng_defects = (np.random.default_rng(s) for s in seeds)
    items = make_items(rng_items, params.n_items, params.n_categories, params.popularity_exponent,
                       params.late_item_share)
    users = make_users(rng_users, items, params.n_users, params.n_categories, params.mean_length)
    no_meta, no_image, corrupt = _pick_defect_items(rng_defects, items, users)

    lines, positions = _plant_line_defects(
        rng_defects, _review_lines(rng_text, items, users, params.n_categories)
    )
    (out / REVIEWS_FILE).write_bytes(gzip_bytes("\n".join(lines) + "\n"))
    dup = json.loads(lines[positions["duplicate_line"] - 1])

    images_dir = out / IMAGES_DIR
    images_dir.mkdir()
    meta: list[tuple[str, str]] = []
    n_images = n_png = 0
    for item in tqdm(items, desc="demo items", unit="item", leave=False, disable=None):
        text = item_text(item, params.n_categories, rng_text)
        img = draw_item_image(item.category, item.style, params.n_categories, params.image_size, rng_images)
        if item.index == no_meta:
            continue  # reviewed, but the metadata dump lost it (and so nothing points at an image)
        fmt = "png" if item.index % 3 == 0 and item.index != corrupt else "jpg"
        relative = f"{IMAGES_DIR}/{item.asin}.{fmt}"
        meta.append((item.asin, meta_line(item.asin, text, image_url(relative, image_base_url))))
        if item.index == no_image:
            continue  # the URL stays in the metadata, the file is not there
        data = encode_image(img, fmt)
        (out / relative).write_bytes(truncate_jpeg(data) if item.index == corrupt else data)
        n_images += 1
        n_png += fmt == "png"
    meta.sort()  # Amazon's dumps come sorted by asin
    (out / META_FILE).write_bytes(gzip_bytes("".join(line + "\n" for _, line in meta)))

    same, chance = _same_group_stats(items, users)
    summary = DemoSummary(
        out_dir=str(out),
        n_users=len(users),
        n_items=len(items),
        n_categories=params.n_categories,
        n_reviews=sum(len(u.events) for u in users),
        n_review_lines=len(lines),
        n_meta_lines=len(meta),
        n_images=n_images,
        n_png=n_png,
        duplicate_user=dup["reviewerID"],
        duplicate_item=dup["asin"],
        missing_meta_item=items[no_meta].asin,
        missing_image_item=items[no_image].asin,
        corrupt_image_item=items[corrupt].asin,
        same_group_fraction=round(same, 4),
        same_group_chance=round(chance, 4),
        late_items=sum(it.late for it in items),
        late_test_targets=sum(items[u.events[-1][0]].late for u in users),
        **positions,
    )
    record = {k: v for k, v in summary.to_dict().items() if k not in ("out_dir", "seconds")}
    (out / SUMMARY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return summary


def generate_demo(out_dir: Path, params: DemoParams, image_base_url: str | None = None) -> DemoSummary:
    """Write the demo catalog to ``out_dir``, replacing that folder as a whole.

    Everything is written into a temp folder beside ``out_dir`` and swapped in at the end, so a run
    that fails leaves the previous catalog untouched.

    Args:
        out_dir: the catalog folder (created; an existing one is replaced).
        params: sizes and seed.
        image_base_url: when given, image URLs are ``image_base_url/images/<file>`` instead of the
            relative ``images/<file>`` that ingest resolves against the metadata file's own URL.

    Returns:
        Counts, the planted defects and the wall seconds.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        summary = _write_catalog(tmp, params, image_base_url)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.out_dir = str(out_dir)
    summary.seconds = round(time.perf_counter() - start, 3)
    log.info(summary.line())
    return summary


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is renamed aside first and deleted after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


def main(argv: list[str] | None = None) -> DemoSummary:
    """CLI: ``python -m demo.generate --out DIR [--params params.yaml] [--image-base-url URL]``."""
    parser = argparse.ArgumentParser(prog="python -m demo.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="catalog folder to (re)create")
    parser.add_argument(
        "--params", type=Path, default=None, help="params file to read the `demo` section of (./params.yaml)"
    )
    parser.add_argument("--image-base-url", default=None, help="make image URLs absolute under this base")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.params is None and not Path("params.yaml").exists():
        log.info("no params.yaml here: using the default demo params")
        params = DemoParams()
    else:
        params = load_params(args.params or "params.yaml").demo
    return generate_demo(args.out, params, args.image_base_url)


if __name__ == "__main__":
    main()
