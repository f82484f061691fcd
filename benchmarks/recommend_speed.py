"""recommend for every user vs one full-ranking evaluation pass, on one checkpoint, side by side.

    python -m benchmarks.recommend_speed --catalog toys [--params FILE] [--epochs 1] [--repeats 3]

On the catalog's split (ingested and split first when missing, as `benchmarks.vs_recbole` does), with the
checkpoint of a short training run (``--epochs``; the timing does not depend on how well it is trained), it
times, best of ``--repeats`` and interleaved so that other work on a shared machine hits both alike:

- the evaluation pass: `cammsr.evaluate.ranking.rank_targets` over every test user (`model_scores`,
  ``evaluate.precision``; full ranking, batched and length-sorted) with every rank resolved, the work a top-k
  over all items compares with (`cammsr evaluate` caps ranks at its deepest cut-off, which settles most users
  after a cheaper first pass);
- the same pass over the serving histories (each user's whole sequence, its last max_len items, the last item
  standing in as the target): the same encoder input as recommend, so the ratio to it compares the ranking
  work alone (serving histories are one item longer than test histories, and attention grows with length);
- recommend: `cammsr.evaluate.recommend.run_recommend` for every user of the split (each whole sequence,
  seen items excluded, top-k, streamed to Parquet), its ranking+writing loop and the whole call (which also
  loads the split and the checkpoint and hashes the checkpoint file).

Prints a table and ends with one JSON line. The claim checked: recommend's loop (scoring, leaving out seen
items, top-k, writing) takes no longer than one evaluation pass plus its own writing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks import machine
from benchmarks.vs_recbole import BENCH, prepare, scratch_params
from cammsr.core.config import RecommendParams, load_params
from cammsr.core.device import resolve_precision
from cammsr.core.malloc import tune_glibc_malloc
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import load_splits
from cammsr.evaluate.ranking import model_scores, rank_targets
from cammsr.evaluate.recommend import run_recommend
from cammsr.model.io import load_checkpoint
from cammsr.train.trainer import run_train


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default="toys")
    ap.add_argument("--params", type=Path, default=None,
                    help="params file defining the catalog (default: the repo's params + a built-in shared catalog, "
                         "as benchmarks.vs_recbole builds it)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of the timed checkpoint")
    ap.add_argument("--model", default="sasrec", choices=["sasrec", "cammsr"])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tune_glibc_malloc()
    if args.params is None:
        args.params = scratch_params(BENCH / f"params-{args.catalog}.yaml", args.catalog)
    p = load_params(args.params)
    paths = prepare(args.catalog, args.params)
    run_split_features(args.catalog, paths)
    run = paths.for_run(paths.root / "recommend_speed" / f"{args.model}-e{args.epochs}")
    if not run.checkpoint.exists():
        train = p.train.model_copy(update={"model": args.model, "epochs": args.epochs, "num_threads": args.threads})
        run_train(args.catalog, train, p.splits, p.evaluate, p.project.model_copy(update={"device": "cpu"}), run)

    split = load_splits(paths.splits_dir)
    model, _ = load_checkpoint(run.checkpoint, split, paths)
    model.eval()
    hist, targets, _ = split.held_out("test", p.splits.max_seq_len)
    serving = [s[-p.splits.max_seq_len:] for s in split.sequences]  # what recommend encodes
    serving_targets = np.array([s[-1] for s in split.sequences], dtype=np.int64)
    # as the evaluate stage ranks: item tables once per pass, evaluate.precision
    precision = resolve_precision(p.evaluate.precision, torch.device("cpu"), auto_on=("cpu",))
    params = RecommendParams(k=args.k, batch_size=args.batch_size)
    eval_s, serving_s, call_s, runs = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="recommend-speed-") as tmp:
        out = Path(tmp) / "recommendations.parquet"
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                rank_targets(model_scores(model), hist, targets, args.batch_size, precision=precision)
            eval_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                rank_targets(model_scores(model), serving, serving_targets, args.batch_size, precision=precision)
            serving_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = run_recommend(args.catalog, params, run, device="cpu", out=out)
            call_s.append(time.perf_counter() - t0)
            runs.append(summary.counts)
        rows, size = pq.ParquetFile(out).metadata.num_rows, out.stat().st_size
    best = min(runs, key=lambda c: c["loop_s"])
    result = {
        "catalog": args.catalog, "model": args.model, "users": best["users"],
        "test_users": len(targets), "items": split.num_items, "k": args.k, "threads": args.threads,
        "eval_pass_s": round(min(eval_s), 3), "eval_pass_serving_histories_s": round(min(serving_s), 3),
        "recommend_loop_s": best["loop_s"], "score_s": best["score_s"],
        "select_s": best["select_s"], "write_s": best["write_s"], "recommend_call_s": round(min(call_s), 3),
        "rows": rows, "file_mb": round(size / 2**20, 2), "users_per_s": best["users_per_s"],
        "peak_rss_mb": max(c["peak_rss_mb"] for c in runs),
        "loop_vs_eval_plus_write": round(best["loop_s"] / (min(eval_s) + best["write_s"]), 2),
        "loop_vs_eval_serving_histories_plus_write": round(best["loop_s"] / (min(serving_s) + best["write_s"]), 2),
        "machine": machine.describe(),
    }
    print(f"\n{args.catalog}: {result['users']} users x {result['items']} items, {args.model} checkpoint, "
          f"{args.threads} threads, best of {args.repeats}")
    lines = [("evaluation: one full-ranking pass (test users)", result["eval_pass_s"]),
             ("  the same pass over the serving histories", result["eval_pass_serving_histories_s"]),
             ("recommend loop, every user:", result["recommend_loop_s"]),
             ("  user vectors and item scores (float32)", result["score_s"]),
             (f"  seen items out + top-{args.k}", result["select_s"]),
             ("  writing (Arrow batch + Parquet row group)", result["write_s"]),
             ("recommend: whole call (load, hash, loop)", result["recommend_call_s"])]
    print(f"{'what':48s} {'seconds':>8s}")
    for what, secs in lines:
        print(f"{what:48s} {secs:8.3f}")
    print(f"recommend loop / (evaluation pass + writing): {result['loop_vs_eval_plus_write']:.2f}; over the serving "
          f"histories: {result['loop_vs_eval_serving_histories_plus_write']:.2f}; {rows} rows, "
          f"{result['file_mb']} MB; peak RSS {result['peak_rss_mb']} MB")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
