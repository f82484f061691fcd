"""How training and full-ranking time and memory grow with users and with items, on synthetic catalogs.

    python -m benchmarks.scale --splits ../exp/toys/data/toys/splits [--quick] [--model sasrec] [--threads 1]
        [--precision auto|float32|bfloat16]

Each synthetic catalog copies a reference split's shape (Toys by default: 19,412 users x 11,924 items):
user sequence lengths drawn from its length distribution, items drawn from its popularity curve (sorted
counts, stretched over the new item count, item order shuffled). Scales, as (users, items) multiples of the
reference:

- full: (1, 1), (4, 1), (16, 1) and (1, 4);
- ``--quick``: (1/4, 1), (1, 1), (4, 1) and (1/4, 4): the same 16x span of users and 4x of items, smaller.

Each scale runs in its own process (peak RSS is then its own): one training epoch (`train_epoch`, the
trainer's batches, precision and dropout) and one full-ranking pass over every user's held-out test target
(`rank_targets` on `model_scores`, evaluate's precision, every rank resolved: the evaluate stage caps ranks at
its deepest cut-off, which a catalog without signal would not make cheaper). Prints a table (time per user, per
user-item pair, peak RSS) and one JSON line with time_per_user_ratio and rss_per_user_ratio (largest over
smallest user count, at the reference item count) and time_per_pair_ratio_items (4x items over 1x, at the
smallest user count). A ratio of 1 is linear growth. The catalogs carry no signal: timing only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import machine
from cammsr.core.config import EvaluateParams, SplitParams, TrainParams
from cammsr.core.device import resolve_precision
from cammsr.core.malloc import tune_glibc_malloc
from cammsr.data.batches import training_pairs
from cammsr.data.splits import SplitData, load_splits
from cammsr.evaluate.ranking import model_scores, rank_targets
from cammsr.model import CAMMSR
from cammsr.model.io import config_from_params
from cammsr.train.trainer import train_epoch

FULL = [(1.0, 1.0), (4.0, 1.0), (16.0, 1.0), (1.0, 4.0)]
QUICK = [(0.25, 1.0), (1.0, 1.0), (4.0, 1.0), (0.25, 4.0)]
FEATURE_DIMS = {"text": 384, "image": 512}  # MiniLM, CLIP ViT-B-32 widths (cammsr: random features)


def synthetic_split(ref: SplitData, users_x: float, items_x: float, seed: int = 0) -> SplitData:
    """A split with ``users_x`` times the reference's users and ``items_x`` times its items, lengths and
    popularity drawn from the reference's."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(s) for s in ref.sequences])
    counts = np.sort(np.bincount(np.concatenate(ref.sequences), minlength=ref.num_items + 1)[1:])[::-1]
    n_users, n_items = round(users_x * len(lengths)), round(items_x * ref.num_items)
    # the popularity curve stretched over n_items ranks, then the ranks dealt to random item indices
    weights = counts[(np.arange(n_items) * ref.num_items) // n_items].astype(np.float64) + 1e-3
    weights = weights[rng.permutation(n_items)] / weights.sum()
    user_lengths = rng.choice(lengths, n_users)
    flat = rng.choice(n_items, size=int(user_lengths.sum()), p=weights) + 1
    sequences = np.split(flat.astype(np.int64), np.cumsum(user_lengths)[:-1])
    categories = ref.num_categories
    item_category = np.concatenate([[-1], rng.integers(0, categories, n_items)]).astype(np.int64)
    return SplitData(item_ids=[f"i{i}" for i in range(n_items)], item_category=item_category,
                     category_names=[f"c{c}" for c in range(categories)], sequences=sequences,
                     user_ids=[f"u{u}" for u in range(n_users)])


def build(split: SplitData, train: TrainParams, seed: int) -> CAMMSR:
    """The model for ``split``; CAMMSR gets random unit-length text and image features."""
    g = torch.Generator().manual_seed(seed)
    n = split.num_items + 1
    feats = {}
    if train.model == "cammsr":
        for m, dim in FEATURE_DIMS.items():
            f = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
            f[0] = 0
            present = torch.ones(n, dtype=torch.bool)
            present[0] = False
            feats[m] = (f, present)
    cfg = config_from_params(train, split, SplitParams(), FEATURE_DIMS["text"] if feats else 0,
                             FEATURE_DIMS["image"] if feats else 0)
    torch.manual_seed(seed)
    return CAMMSR(cfg, torch.from_numpy(split.item_category), *feats.get("text", (None, None)),
                  *feats.get("image", (None, None)))


def measure(ref_dir: Path, users_x: float, items_x: float, model: str, threads: int, precision: str) -> dict:
    """One scale: generate, train one epoch, rank every test user; seconds and peak RSS (this process)."""
    torch.set_num_threads(threads)
    tune_glibc_malloc()
    split = synthetic_split(load_splits(ref_dir), users_x, items_x)
    train, evaluate = TrainParams(model=model, precision=precision), EvaluateParams(precision=precision)
    split_params = SplitParams()
    net = build(split, train, seed=0)
    device = torch.device("cpu")
    opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True)
    inputs, targets = training_pairs(split.train_sequences(), split_params.max_seq_len, windows=train.windows)
    t0 = time.perf_counter()
    train_epoch(net, opt, inputs, targets, train.batch_size, torch.Generator().manual_seed(0), device, "epoch",
                batch_targets=train.batch_targets, bucket_batches=train.bucket_batches,
                precision=resolve_precision(train.precision, device))
    train_s = time.perf_counter() - t0
    net.eval()
    hist, test_targets, _ = split.held_out("test", split_params.max_seq_len)
    t0 = time.perf_counter()
    with torch.no_grad():
        rank_targets(model_scores(net), hist, test_targets, evaluate.batch_size, evaluate.mask_history, device,
                     resolve_precision(evaluate.precision, device, auto_on=("cpu",)))
    rank_s = time.perf_counter() - t0
    return {"users_x": users_x, "items_x": items_x, "users": len(split.sequences), "items": split.num_items,
            "interactions": int(sum(len(s) for s in split.sequences)), "test_users": len(test_targets),
            "train_s": round(train_s, 3), "rank_s": round(rank_s, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=Path, default=Path("data/toys/splits"), help="the reference split folder")
    ap.add_argument("--quick", action="store_true", help="1/4, 1, 4x users and 4x items at 1/4 users")
    ap.add_argument("--model", default="sasrec", choices=["sasrec", "cammsr"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="train.precision and evaluate.precision")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "USERS_X,ITEMS_X": measure in this process
    args = ap.parse_args(argv)
    if args.one:
        users_x, items_x = map(float, args.one.split(","))
        print(json.dumps(measure(args.splits, users_x, items_x, args.model, args.threads, args.precision)))
        return {}

    rows = []
    for users_x, items_x in QUICK if args.quick else FULL:
        cmd = [sys.executable, "-m", "benchmarks.scale", "--splits", str(args.splits), "--model", args.model,
               "--threads", str(args.threads), "--precision", args.precision, "--one", f"{users_x},{items_x}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"scale {users_x}x users, {items_x}x items failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        total = row["train_s"] + row["rank_s"]
        row["us_per_user"] = round(1e6 * total / row["users"], 2)
        row["ns_per_pair"] = round(1e9 * total / (row["users"] * row["items"]), 3)
        row["kb_per_user"] = round(1024 * row["peak_rss_mb"] / row["users"], 2)
        rows.append(row)
        print(f"{row['users_x']:5g}x users {row['items_x']:3g}x items: {row['users']:7d} users x "
              f"{row['items']:6d} items, epoch {row['train_s']:8.2f} s, ranking {row['rank_s']:7.2f} s, "
              f"{row['us_per_user']:8.1f} us/user, {row['ns_per_pair']:7.3f} ns/pair, "
              f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)

    base_items = [r for r in rows if r["items_x"] == 1.0]
    small, large = min(base_items, key=lambda r: r["users"]), max(base_items, key=lambda r: r["users"])
    more_items = next(r for r in rows if r["items_x"] > 1.0)
    same_users = next(r for r in base_items if r["users_x"] == more_items["users_x"])
    result = {
        "model": args.model, "threads": args.threads, "precision": args.precision, "quick": args.quick,
        "reference": str(args.splits),
        "time_per_user_ratio": round(large["us_per_user"] / small["us_per_user"], 3),
        "rss_per_user_ratio": round(large["kb_per_user"] / small["kb_per_user"], 3),
        "time_per_pair_ratio_items": round(more_items["ns_per_pair"] / same_users["ns_per_pair"], 3),
        "users_span": f"{large['users_x']:g}x over {small['users_x']:g}x",
        "items_span": f"{more_items['items_x']:g}x over 1x items at {more_items['users_x']:g}x users",
        "scales": rows,
        "machine": machine.describe(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
