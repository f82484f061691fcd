"""Train and test RecBole 1.2.1's SASRec on an exported catalog; write timings and metrics as JSON.

Runs in the RecBole venv (``bash benchmarks/setup_recbole.sh``), started by `benchmarks.vs_recbole`:

    .venv-recbole/bin/python benchmarks/recbole_run.py --data-path data/bench/toys/recbole --dataset toys \
        --epochs 2 --seed 0 --threads 2 --out result.json

Shims for RecBole, here and nowhere else:
- importing RecBole's models switches on ``torch.autograd.set_detect_anomaly(True)`` for the whole
  process (a module-level line in its SINE model); we switch it off again and record that it is off;
- ``torch.load`` defaults to ``weights_only=True`` in torch >= 2.6, but RecBole reloads its own
  best checkpoint (a pickled config) with a bare ``torch.load``: default it to False for RecBole;
- RecBole parses ``sys.argv`` itself: it sees only the program name;
- the glibc allocator variables (MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_) must be in the
  environment before the process starts: the caller sets them, we only record them.

Besides RecBole's own test metrics (its protocol: history not masked), the trained model is also
ranked by *our* ranker (`cammsr.evaluate.ranking.rank_targets`, ties against the target) with and without
history masking, so both sides' numbers come from one metric implementation.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _timed(fn, log: list[dict]):
    """Wrap a trainer method to record wall and CPU seconds of each call."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        log.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0})
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--patience", type=int, default=10, help="RecBole stopping_step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2048, help="train_batch_size (RecBole default 2048)")
    ap.add_argument("--eval-batch-size", type=int, default=4096, help="eval_batch_size (RecBole default)")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--work-dir", required=True, help="RecBole writes log/, saved/ here")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", type=Path, default=None,
                    help="a checkpoint RecBole saved (saved/*.pth): continue training after its epoch")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.argv = sys.argv[:1]  # RecBole's Config parses the command line itself
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.interaction import Interaction
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    anomaly_after_import = torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(False)  # trap 1: RecBole's SINE module turns it on globally
    torch.load = functools.partial(torch.load, weights_only=False)  # RecBole reloads its own pickled checkpoint

    sys.path.insert(0, str(REPO))
    from cammsr.evaluate.metrics import metrics_from_ranks
    from cammsr.evaluate.ranking import rank_targets

    work, data_path, out = (Path(p).resolve() for p in (args.work_dir, args.data_path, args.out))
    resume = args.resume.resolve() if args.resume else None
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # RecBole writes log/ and log_tensorboard/ into the working directory
    config = Config(model="SASRec", dataset=args.dataset, config_dict={
        "data_path": str(data_path), "checkpoint_dir": str(work / "saved"),
        "use_gpu": False, "seed": args.seed, "reproducibility": True, "show_progress": False, "state": "WARNING",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "train_neg_sample_args": None, "loss_type": "CE",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "epochs": args.epochs, "stopping_step": args.patience, "eval_step": 1,
        "train_batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "learning_rate": 1e-3, "weight_decay": 0.0,
        "hidden_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "log_wandb": False, "worker": 0,
    })
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    prep_s = time.perf_counter() - t0

    def held_out(loader) -> dict:
        feat = loader._dataset.inter_feat
        users = dataset.id2token("user_id", feat["user_id"].numpy())
        items = feat["item_id"].numpy()
        seqs, lens = feat["item_id_list"].numpy(), feat["item_length"].numpy()
        return {"users": users.tolist(), "targets": dataset.id2token("item_id", items).tolist(),
                "histories": [dataset.id2token("item_id", s[:n]).tolist() for s, n in zip(seqs, lens, strict=True)],
                "target_ids": items, "history_ids": [s[:n] for s, n in zip(seqs, lens, strict=True)]}

    test, valid = held_out(test_data), held_out(valid_data)
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    resumed_from = None
    if resume is not None:  # model, optimizer, epoch, patience counter and best score; not the RNG state
        trainer.resume_checkpoint(resume)
        resumed_from = trainer.start_epoch - 1
    train_log: list[dict] = []
    valid_log: list[dict] = []
    trainer._train_epoch = _timed(trainer._train_epoch, train_log)
    trainer._valid_epoch = _timed(trainer._valid_epoch, valid_log)
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False, verbose=False)
    w0, c0 = time.perf_counter(), time.process_time()
    recbole_test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    test_eval = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}

    model.eval()

    @torch.no_grad()
    def score(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return model.full_sort_predict(Interaction({"item_id_list": seq, "item_length": lengths}))

    ours = {}
    for mask in (False, True):
        w0 = time.perf_counter()
        ranks = rank_targets(score, test["history_ids"], test["target_ids"], args.eval_batch_size, mask)
        m = metrics_from_ranks(ranks, [10])
        ours["masked" if mask else "unmasked"] = {"ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"],
                                                  "mrr@10": m["mrr@10"], "wall_s": time.perf_counter() - w0}

    result = {
        "side": "recbole", "seed": args.seed, "threads": torch.get_num_threads(),
        "anomaly_detection_after_import": anomaly_after_import, "anomaly_detection": torch.is_anomaly_enabled(),
        "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")},
        "torch": torch.__version__, "prep_s": prep_s,
        "train_targets": len(train_data.dataset), "test_users": len(test["users"]),
        "valid_users": len(valid["users"]), "steps_per_epoch": len(train_data),
        "resumed_after_epoch": resumed_from,
        "epochs_run": len(train_log), "train_epochs": train_log, "valid_passes": valid_log, "test_pass": test_eval,
        "best_valid_ndcg@10": float(best_valid),
        "recbole_test": {k.lower(): float(v) for k, v in recbole_test.items()},
        "our_ranker_test": ours, "peak_rss_mb": _rss_mb(),
        "test": {k: test[k] for k in ("users", "targets", "histories")},
        "valid": {k: valid[k] for k in ("users", "targets")},
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
