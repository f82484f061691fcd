"""Where our time goes: torch.profiler over training steps and one full-ranking pass.

    python -m benchmarks.profile_ours --catalog toys [--params data/bench/params-toys.yaml] [--model sasrec]
        [--steps 20] [--threads 2] [--eval-users 4096] [--malloc tuned|default] [--ce chunked|dense]
        [--set swap_cl=false ...]

Prints the top operators by self CPU time for (1) ``--steps`` training steps of `cammsr.train.trainer.train_epoch`'s
loop and (2) a full-ranking pass of `cammsr.evaluate.ranking.rank_targets` over ``--eval-users`` test users,
plus plain wall and CPU times without the profiler. Use it before and after a change to see what it
bought; ``--malloc default`` leaves glibc's allocator as it is (no `cammsr.core.malloc.tune_glibc_malloc`)
and ``--ce dense`` swaps the chunked CE for ``F.cross_entropy`` on the whole score matrix.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cammsr.model.cammsr as model_mod
from benchmarks.vs_recbole import scratch_params_path
from cammsr.core.config import load_params
from cammsr.core.device import resolve_precision
from cammsr.core.malloc import tune_glibc_malloc
from cammsr.core.paths import CatalogPaths
from cammsr.data.batches import bucketed_batches, pad_right, training_pairs
from cammsr.data.splits import load_splits
from cammsr.evaluate.ranking import rank_targets
from cammsr.model.io import build_model
from cammsr.train.experiments import train_overrides


def train_steps(model, opt, inputs, targets, batches) -> None:
    """The body of `cammsr.train.trainer.train_epoch` for the given index batches (single process)."""
    model.train()
    for idx in batches:
        seq = pad_right([inputs[i] for i in idx])
        tgt = pad_right([targets[i] for i in idx])
        loss, _ = model(seq, tgt, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default="toys")
    ap.add_argument("--params", type=Path, default=None,
                    help="default: data/bench/params-<catalog>.yaml, as benchmarks.vs_recbole writes it")
    ap.add_argument("--model", default="sasrec", choices=["sasrec", "cammsr"])
    ap.add_argument("--batch-size", type=int, default=364, help="sequences per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-users", type=int, default=4096)
    ap.add_argument("--eval-batch", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-profiler", action="store_true", help="only the plain wall times")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--ce", choices=["chunked", "dense"], default="chunked")
    ap.add_argument("--ce-precision", choices=["float32", "bfloat16"], default=None,
                    help="dtype of the chunked CE's matmuls (default: as train.ce_precision resolves here)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train param (repeatable), e.g. --set hidden_size=32")
    args = ap.parse_args()
    if args.malloc == "tuned":
        tune_glibc_malloc()
    if args.ce == "dense":
        model_mod.chunked_softmax_ce = lambda h, table, targets: F.cross_entropy(h @ table.T, targets, reduction="sum")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p = load_params(args.params or scratch_params_path(args.catalog))
    paths = CatalogPaths.of(args.catalog, p.project.data_dir)
    split = load_splits(paths.splits_dir)
    train = p.train.model_copy(update={"model": args.model, **train_overrides(args.set, p.train)})
    model = build_model(train, p.splits, split, paths, seed=0)
    model.ce_dtype = resolve_precision(args.ce_precision or train.ce_precision, torch.device("cpu"), auto_on=("cpu",))
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, fused=True)  # as cammsr.train.trainer.run_train
    inputs, targets = training_pairs(split.train_sequences(), p.splits.max_seq_len)
    lengths = np.array([len(s) for s in inputs])
    batches = list(itertools.islice(bucketed_batches(lengths, args.batch_size, torch.Generator().manual_seed(0)),
                                    args.steps + 2))
    train_steps(model, opt, inputs, targets, batches[:2])  # warm-up
    batches = batches[2:]
    hist, tgts, _ = split.held_out("test", p.splits.max_seq_len)
    hist, tgts = hist[: args.eval_users], tgts[: args.eval_users]

    t0, c0, ru0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    train_steps(model, opt, inputs, targets, batches)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    model.eval()
    t0 = time.perf_counter()
    rank_targets(model.score_last, hist, tgts, args.eval_batch)
    eval_s = time.perf_counter() - t0
    n_targets = int(sum(lengths[i].sum() for i in batches))
    print(f"{args.model} malloc={args.malloc} ce={args.ce} ce_precision={model.ce_dtype}: {len(batches)} steps, "
          f"{n_targets} targets in "
          f"{train_s:.2f} s wall, {train_cpu:.2f} s CPU of which {ru1.ru_stime - ru0.ru_stime:.2f} s kernel, "
          f"{ru1.ru_minflt - ru0.ru_minflt} page faults ({n_targets / train_s:.0f} targets/s); eval {len(tgts)} "
          f"users in {eval_s:.2f} s ({len(tgts) / eval_s:.0f} users/s); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.no_profiler:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_steps(model, opt, inputs, targets, batches)
    print(f"--- training, {len(batches)} steps: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    model.eval()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rank_targets(model.score_last, hist, tgts, args.eval_batch)
    print(f"--- full ranking, {len(tgts)} users: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
