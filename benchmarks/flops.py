"""The arithmetic of a training step: matmul FLOPs counted over the trainer's own batches.

    python -m benchmarks.flops --catalog toys --params data/bench/params-toys.yaml --model sasrec \
        [--steps 8] [--batch-size 364] [--batch-targets 2048] [--set swap_cl=false ...] [--out flops.json]

Counts, with `torch.utils.flop_counter.FlopCounterMode`, the FLOPs of the matrix products (mm, addmm, bmm,
attention kernels) in the forward and backward pass of the first ``--steps`` training batches, drawn as
`cammsr.train.trainer` draws them (`bucketed_batches`, seed 0), and prints one JSON line: FLOPs per step and
per target, and by operator. Elementwise work (softmax, GELU, dropout, norms) is not counted.

`benchmarks.vs_recbole` runs it for our SASRec and for CAMMSR with text and image on the same batches:
the ratio of the two is the floor under their epoch-time ratio that faster kernels cannot go below
(both sides run the same kind of matmuls, at d = 64 per modality, so the time ratio tracks it).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cammsr.core.config import load_params
from cammsr.core.device import resolve_precision
from cammsr.core.paths import CatalogPaths
from cammsr.data.batches import bucketed_batches, pad_right, training_pairs
from cammsr.data.splits import load_splits
from cammsr.model.io import build_model
from cammsr.train.experiments import train_overrides


def training_flops(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Matmul FLOPs of forward + backward over ``batches`` of (seq [B, L], targets [B, L]) in training mode.

    Returns {"flops": total, "steps": len(batches), "targets": positions with a target, "by_op": {op: flops}}.
    No optimizer step is taken: the weights, and so every batch's arithmetic, stay as they were.
    """
    model.train()
    counter = FlopCounterMode(display=False)
    targets = 0
    with counter:
        for seq, tgt in batches:
            loss, _ = model(seq, tgt, None)
            loss.backward()
            targets += int((tgt > 0).sum())
    model.zero_grad(set_to_none=True)
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return {"flops": int(counter.get_total_flops()), "steps": len(batches), "targets": targets, "by_op": by_op}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--model", choices=["sasrec", "cammsr"], default="sasrec")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: train.batch_size)")
    ap.add_argument("--batch-targets", type=int, default=None, help="default: train.batch_targets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train param (repeatable), e.g. --set hidden_size=32")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON line to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    paths = CatalogPaths.of(args.catalog, p.project.data_dir)
    split = load_splits(paths.splits_dir)
    train = p.train.model_copy(update={"model": args.model, "batch_size": args.batch_size or p.train.batch_size,
                                       "batch_targets": args.batch_targets or p.train.batch_targets,
                                       **train_overrides(args.set, p.train)})
    model = build_model(train, p.splits, split, paths, seed=0)
    model.ce_dtype = resolve_precision(train.ce_precision, torch.device("cpu"), auto_on=("cpu",))
    inputs, targets = training_pairs(split.train_sequences(), p.splits.max_seq_len, windows=train.windows)
    lengths = np.array([int(np.count_nonzero(t)) for t in targets])  # as train_epoch: targets per sequence
    order = bucketed_batches(lengths, train.batch_size, torch.Generator().manual_seed(0), train.bucket_batches,
                             train.batch_targets)
    batches = [(pad_right([inputs[i] for i in idx]), pad_right([targets[i] for i in idx]))
               for idx in itertools.islice(order, args.steps)]
    result = {"catalog": args.catalog, "model": args.model, "set": args.set, "modalities": list(model.mods),
              **training_flops(model, batches)}
    result["flops_per_step"] = result["flops"] / max(result["steps"], 1)
    result["flops_per_target"] = result["flops"] / max(result["targets"], 1)
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
