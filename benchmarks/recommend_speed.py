"""recommend for every user vs one full-ranking evaluation pass, on one checkpoint, side by side.

    python -m benchmarks.recommend_speed --catalog toys --params data/bench/params.yaml [--epochs 1] [--repeats 3]

On the catalog's split (ingested and split first when missing, as `benchmarks.vs_recbole` does), with the
checkpoint of a short training run (``--epochs``; the timing does not depend on how well it is trained), it
times, best of ``--repeats`` and interleaved so that other work on a shared machine hits both alike:

- the evaluation pass: `cammsr.evaluate.ranking.rank_targets` over every test user (full ranking, batched
  and length-sorted), what `cammsr evaluate` does per part and ranker;
- recommend: `cammsr.evaluate.recommend.run_recommend` for every user of the split (each whole sequence,
  seen items excluded, top-k, streamed to Parquet), its ranking+writing loop and the whole call (which also
  loads the split and the checkpoint and hashes the checkpoint file).

Prints a table and ends with one JSON line. The claim checked: recommend's loop takes no longer than one
evaluation pass plus writing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.vs_recbole import prepare
from cammsr.core.config import RecommendParams, load_params
from cammsr.core.malloc import tune_glibc_malloc
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import load_splits
from cammsr.evaluate.ranking import rank_targets
from cammsr.evaluate.recommend import run_recommend
from cammsr.model.io import load_checkpoint
from cammsr.train.trainer import run_train


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default="toys")
    ap.add_argument("--params", type=Path, default=Path("data/bench/params.yaml"))
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of the timed checkpoint")
    ap.add_argument("--model", default="sasrec", choices=["sasrec", "cammsr"])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tune_glibc_malloc()
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
    params = RecommendParams(k=args.k, batch_size=args.batch_size)
    eval_s, loop_s, call_s = [], [], []
    with tempfile.TemporaryDirectory(prefix="recommend-speed-") as tmp:
        out = Path(tmp) / "recommendations.parquet"
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                rank_targets(model.score_last, hist, targets, args.batch_size)
            eval_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = run_recommend(args.catalog, params, run, device="cpu", out=out)
            call_s.append(time.perf_counter() - t0)
            loop_s.append(summary.counts["rank_write_s"])
        rows, size = pq.ParquetFile(out).metadata.num_rows, out.stat().st_size
    result = {
        "catalog": args.catalog, "model": args.model, "users": summary.counts["users"],
        "test_users": len(targets), "items": split.num_items, "k": args.k, "threads": args.threads,
        "eval_pass_s": round(min(eval_s), 3), "recommend_loop_s": round(min(loop_s), 3),
        "recommend_call_s": round(min(call_s), 3), "rows": rows, "file_mb": round(size / 2**20, 2),
        "users_per_s": round(summary.counts["users"] / min(loop_s), 1),
        "peak_rss_mb": summary.counts["peak_rss_mb"],
        "loop_vs_eval": round(min(loop_s) / min(eval_s), 2),
    }
    print(f"\n{args.catalog}: {result['users']} users x {result['items']} items, {args.model} checkpoint, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'what':46s} {'seconds':>8s}")
    print(f"{'evaluation: one full-ranking pass (test users)':46s} {result['eval_pass_s']:8.3f}")
    print(f"{'recommend: rank + top-' + str(args.k) + ' + write (every user)':46s} {result['recommend_loop_s']:8.3f}")
    print(f"{'recommend: whole call (load, hash, rank, write)':46s} {result['recommend_call_s']:8.3f}")
    print(f"recommend loop / evaluation pass: {result['loop_vs_eval']:.2f}x; {rows} rows, {result['file_mb']} MB; "
          f"peak RSS {result['peak_rss_mb']} MB")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
