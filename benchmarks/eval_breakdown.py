"""Where a full-ranking pass goes, and what each evaluation fix buys, measured side by side in one run.

    python -m benchmarks.eval_breakdown --catalog toys --params data/bench/params-toys.yaml \
        --run-dir data/bench/vs_recbole/toys/sasrec-s0-e15-p10-t2-b364 [--part valid] [--repeats 5]

On one trained checkpoint and the catalog's valid (or test) users, batched and length-sorted as
`cammsr.evaluate.ranking.rank_targets` does, it times (best of ``--repeats``):

- the encoder over every position (before) vs only the scored last position in the final layer (after);
- the score matmul against the whole item table;
- rank counting the old way (NaN pass, +inf pass, torch compare + bool sum) vs `cammsr.evaluate.metrics.target_ranks`;
- the whole `rank_targets` pass;

and prints a table of seconds and before/after ratios, ending with one JSON line. The old and new
rank counts are checked to be identical, and the two encoder paths to agree within 1e-4.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cammsr.core.config import load_params
from cammsr.core.malloc import tune_glibc_malloc
from cammsr.core.paths import CatalogPaths
from cammsr.data.batches import pad_right
from cammsr.data.splits import load_splits
from cammsr.evaluate.metrics import target_ranks
from cammsr.evaluate.ranking import rank_targets
from cammsr.model.io import load_checkpoint


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def old_target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The counting before this benchmark's fixes: three passes and torch's bool sum."""
    target_scores = scores.gather(1, targets[:, None])
    if torch.isnan(scores).any() or torch.isposinf(scores).any():
        raise ValueError("non-finite scores")
    return (scores >= target_scores).sum(dim=1) - 1


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--run-dir", type=Path, default=None, help="folder with models/model.pt (default: the catalog's)")
    ap.add_argument("--part", choices=["valid", "test"], default="valid")
    ap.add_argument("--batch-size", type=int, default=None, help="users per batch (default: evaluate.batch_size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tune_glibc_malloc()
    p = load_params(args.params)
    paths = CatalogPaths.of(args.catalog, p.project.data_dir)
    paths = paths.for_run(args.run_dir) if args.run_dir else paths
    split = load_splits(paths.splits_dir)
    model, _ = load_checkpoint(paths.checkpoint, split, paths)
    model.eval()
    bs = args.batch_size or p.evaluate.batch_size
    hist, targets, _ = split.held_out(args.part, p.splits.max_seq_len)
    lengths = np.array([len(h) for h in hist], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    batches = [(pad_right([hist[i] for i in idx]), torch.from_numpy(lengths[idx]), torch.from_numpy(targets[idx]))
               for idx in (order[s:s + bs] for s in range(0, len(order), bs))]
    rows = [torch.arange(len(seq)) for seq, _, _ in batches]

    with torch.inference_mode():
        full = [model.encode_views(seq).z[:, r, n - 1] for (seq, n, _), r in zip(batches, rows, strict=True)]
        last = [model.encode_views(seq, last=n - 1).z[:, :, 0] for seq, n, _ in batches]
        drift = max(float((a - b).abs().max()) for a, b in zip(full, last, strict=True))
        assert drift < 1e-4, f"last-position encoder differs from the full pass by {drift}"
        scores = [model.scores(z).float() for z in last]
        old = [old_target_ranks(s, t) for s, (_, _, t) in zip(scores, batches, strict=True)]
        new = [target_ranks(s, t) for s, (_, _, t) in zip(scores, batches, strict=True)]
        assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True)), "rank counts differ"
        t = {
            "encoder_all_positions_s": best_of(lambda: [model.encode_views(seq) for seq, _, _ in batches],
                                               args.repeats),
            "encoder_last_position_s": best_of(lambda: [model.encode_views(seq, last=n - 1)
                                                        for seq, n, _ in batches], args.repeats),
            "score_matmul_s": best_of(lambda: [model.scores(z) for z in last], args.repeats),
            "rank_count_old_s": best_of(lambda: [old_target_ranks(s, b[2]) for s, b in zip(scores, batches,
                                                                                            strict=True)],
                                        args.repeats),
            "rank_count_new_s": best_of(lambda: [target_ranks(s, b[2]) for s, b in zip(scores, batches, strict=True)],
                                        args.repeats),
            "rank_targets_s": best_of(lambda: rank_targets(model.score_last, hist, targets, bs), args.repeats),
        }
    before = t["encoder_all_positions_s"] + t["score_matmul_s"] + t["rank_count_old_s"]
    result = {"catalog": args.catalog, "users": len(targets), "items": split.num_items, "batch_size": bs,
              "threads": args.threads, **{k: round(v, 4) for k, v in t.items()},
              "encoder_speedup": round(t["encoder_all_positions_s"] / t["encoder_last_position_s"], 2),
              "rank_count_speedup": round(t["rank_count_old_s"] / t["rank_count_new_s"], 2),
              "components_before_s": round(before, 4),
              "pass_speedup": round(before / t["rank_targets_s"], 2),
              "users_per_s": round(len(targets) / t["rank_targets_s"])}
    print(f"{args.catalog} {args.part}: {len(targets)} users x {split.num_items} items, batches of {bs}, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'encoder, every position (before)':40} {t['encoder_all_positions_s']:8.3f} s")
    print(f"{'encoder, last position in final layer':40} {t['encoder_last_position_s']:8.3f} s  "
          f"({result['encoder_speedup']}x)")
    print(f"{'score matmul':40} {t['score_matmul_s']:8.3f} s")
    print(f"{'rank count: NaN, +inf, torch bool sum':40} {t['rank_count_old_s']:8.3f} s")
    print(f"{'rank count: row max + numpy per row':40} {t['rank_count_new_s']:8.3f} s  "
          f"({result['rank_count_speedup']}x)")
    print(f"{'before: sum of the old components':40} {before:8.3f} s")
    print(f"{'after: rank_targets, whole pass':40} {t['rank_targets_s']:8.3f} s  ({result['pass_speedup']}x, "
          f"{result['users_per_s']} users/s)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
