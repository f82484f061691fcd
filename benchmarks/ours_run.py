"""Train and test our SASRec or CAMMSR through the real trainer; write timings and metrics as JSON.

Started by `benchmarks.vs_recbole` in its own process (so peak RSS is this run's alone):

    python -m benchmarks.ours_run --catalog toys --params data/bench/params-toys.yaml --model sasrec \
        --epochs 2 --seed 0 --threads 2 --batch-size 364 --out result.json

It calls `cammsr.train.trainer.run_train` (early stopping, best checkpoint) unchanged, timing each call of
`train_epoch` and `validate` from outside, then ranks the test users with the best checkpoint by
`cammsr.evaluate.ranking.rank_targets`, with and without history masking.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

import cammsr.train.trainer as train_mod
from cammsr.core.config import load_params
from cammsr.core.device import resolve_precision
from cammsr.core.paths import CatalogPaths
from cammsr.data.batches import bucketed_batches, training_pairs
from cammsr.data.splits import load_splits
from cammsr.evaluate.metrics import metrics_from_ranks
from cammsr.evaluate.ranking import model_scores, rank_targets
from cammsr.model.io import load_checkpoint


def _timed(fn, log: list[dict]):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        log.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0})
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--model", choices=["sasrec", "cammsr"], default="sasrec")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, required=True, help="sequences per step")
    ap.add_argument("--batch-targets", type=int, default=None, help="fill steps by targets (train.batch_targets)")
    ap.add_argument("--bucket-batches", type=int, default=None, help="default: train.bucket_batches")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="default: evaluate.batch_size")
    ap.add_argument("--run-dir", type=Path, required=True, help="models/, metrics of this run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last epoch")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    paths = CatalogPaths.of(args.catalog, p.project.data_dir).for_run(args.run_dir)
    train = p.train.model_copy(update={"model": args.model, "epochs": args.epochs, "patience": args.patience,
                                       "batch_size": args.batch_size, "num_threads": args.threads,
                                       "batch_targets": args.batch_targets,
                                       "bucket_batches": args.bucket_batches or p.train.bucket_batches})
    evaluate = p.evaluate if args.eval_batch_size is None else p.evaluate.model_copy(
        update={"batch_size": args.eval_batch_size})
    project = p.project.model_copy(update={"seed": args.seed, "device": "cpu"})

    train_log: list[dict] = []
    valid_log: list[dict] = []
    train_mod.train_epoch = _timed(train_mod.train_epoch, train_log)
    train_mod.validate = _timed(train_mod.validate, valid_log)
    summary = train_mod.run_train(args.catalog, train, p.splits, evaluate, project, paths, resume=args.resume)

    split = load_splits(paths.splits_dir)
    inputs, _ = training_pairs(split.train_sequences(), p.splits.max_seq_len)
    model, ckpt = load_checkpoint(paths.checkpoint, split, paths)
    model.eval()
    hist, targets, _ = split.held_out("test", p.splits.max_seq_len)
    test = {}
    # as the evaluate stage ranks: item tables once per pass, evaluate.precision (exact either way)
    precision = resolve_precision(evaluate.precision, torch.device("cpu"), auto_on=("cpu",))
    for mask in (False, True):
        w0, c0 = time.perf_counter(), time.process_time()
        ranks = rank_targets(model_scores(model), hist, targets, evaluate.batch_size, mask, precision=precision,
                             cap=10)
        m = metrics_from_ranks(ranks, [10])
        test["masked" if mask else "unmasked"] = {
            "ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"], "mrr@10": m["mrr@10"],
            "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    result = {
        "side": "ours", "model": args.model, "seed": args.seed, "threads": torch.get_num_threads(),
        "modalities": list(model.mods), "parameters": model.num_parameters(),
        "train_sequences": len(inputs), "train_targets": int(sum(len(s) for s in inputs)),
        "steps_per_epoch": len(list(bucketed_batches(np.array([len(s) for s in inputs]), train.batch_size,
                                                      torch.Generator().manual_seed(0), train.bucket_batches,
                                                      train.batch_targets))),
        "batch_size": args.batch_size, "batch_targets": args.batch_targets, "bucket_batches": train.bucket_batches,
        "eval_batch_size": evaluate.batch_size, "test_users": len(targets), "valid_users": len(targets),
        "resumed": args.resume, "epochs_run": len(train_log), "best_epoch": int(ckpt.get("epoch", -1)),
        "train_epochs": train_log, "valid_passes": valid_log,
        "best_valid_ndcg@10": summary.counts.get("best_valid_ndcg@10"), "test": test,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
