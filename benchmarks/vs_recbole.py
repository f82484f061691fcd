"""Ours vs RecBole 1.2.1 on the same split, machine and thread count: speed, accuracy, memory.

    bash benchmarks/setup_recbole.sh                     # once: RecBole in its own venv (.venv-recbole)
    python -m benchmarks.vs_recbole --catalog toys       # prints a table, ends with one JSON line
    python -m benchmarks.vs_recbole --catalog toys --quick            # 1 epoch each, 1 seed
    python -m benchmarks.vs_recbole --catalog toys --seeds 0,1,2 --epochs 200 --patience 10   # full parity

What runs, each side in its own process (peak RSS is that process's own):
1. the catalog's split (ingest + split when missing; with ``--params`` absent and the catalog ``toys``,
   a scratch params file ``data/bench/params-toys.yaml`` points at ``../shared/data/toys-seq/``), exported
   with `cammsr.data.export_recbole` to RecBole atomic files;
2. per seed, RecBole's SASRec (`benchmarks/recbole_run.py`, in the RecBole venv, both known traps fixed:
   anomaly detection off, ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``) and our SASRec
   (`benchmarks/ours_run.py`, the real trainer), same config: d 64, 2 layers, 2 heads, FFN 256,
   dropout 0.5, CE over all items, max length 50, lr 1e-3, Adam(W) without weight decay;
3. our CAMMSR for the timing epochs, on whatever feature stores the catalog has (toys: none, so ID
   only), and with ``--cammsr-synthetic-features`` also with id+text+image on random stores of the
   real encoder widths (384, 512) beside the same split: the cost of all three modalities, and the matmul
   FLOPs per training target of that model and of our SASRec on the same first batches (`benchmarks.flops`):
   the floor under the epoch ratio;
4. RecBole's valid and test targets (and test histories) checked against our split.

Counting: RecBole trains one augmented prefix per target (``train_targets`` = its training rows);
we train whole sequences with a loss at every position (``train_targets`` = positions with a
target). Both are the same (history, target) pairs, except that for a user with more than 51
training items we keep only the last 50 targets. Batches: RecBole 2048 prefixes, ours whole
sequences up to ``--batch-targets`` (2048) targets per step (``train.batch_targets``), so both take
the same number of optimizer steps per epoch and every target weighs the same in its step (a fixed
number of sequences per step, bucketed by length, gave short sequences' targets up to 16x the
weight of long ones' and learned slower: see benchmarks/README.md). Speedups are throughput ratios (targets/s,
users/s), wall clock, of each side's best epoch / validation pass (on a shared machine other work
only adds time); medians and CPU seconds are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median, stdev

import numpy as np
import yaml

from benchmarks import machine
from cammsr.core.config import load_params
from cammsr.core.paths import CatalogPaths
from cammsr.data.export_recbole import check_targets, export_dir, run_export_recbole
from cammsr.data.split_features import run_split_features
from cammsr.data.splits import load_splits
from features.store import FeatureRows, write_rows

log = logging.getLogger("vs_recbole")
REPO = Path(__file__).resolve().parents[1]
BENCH = Path("data/bench")
MALLOC_FIX = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
TOYS = {"reviews": "file:../shared/data/toys-seq/reviews_ToysSeq_5.json.gz",
        "meta": "file:../shared/data/toys-seq/meta_ToysSeq.json.gz", "images": False,
        "source_dep": "../shared/data/toys-seq"}
SCIENTIFIC = {"reviews": "file:../shared/data/scientific-mm/reviews_Scientific_5.json.gz",
              "meta": "file:../shared/data/scientific-mm/meta_Scientific.json.gz", "images": False,
              "source_dep": "../shared/data/scientific-mm"}
SHARED_CATALOGS = {"toys": TOYS, "scientific": SCIENTIFIC}  # ID-only comparisons need no features


def scratch_params(path: Path, catalog: str) -> Path:
    """A params file = the repo's params.yaml + one shared catalog (toys, scientific), outputs under data/bench/."""
    if catalog not in SHARED_CATALOGS:
        raise SystemExit(f"catalog {catalog!r}: pass --params with a file that defines it "
                         f"(built in: {', '.join(SHARED_CATALOGS)})")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["project"]["data_dir"] = str(BENCH)
    params["catalogs"] = {catalog: SHARED_CATALOGS[catalog]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def prepare(catalog: str, params_path: Path) -> CatalogPaths:
    """Ingest and split the catalog when its split is missing; export it for RecBole."""
    p = load_params(params_path)
    paths = CatalogPaths.of(catalog, p.project.data_dir)
    if not (paths.splits_dir / "sequences.parquet").exists():
        from cammsr.data.splits import run_split
        from cammsr.ingest.stage import run_ingest

        if not paths.interactions.exists():
            run_ingest(catalog, p.catalog(catalog), p.ingest, paths, root=Path.cwd())
        run_split(catalog, p.splits, paths)
    run_export_recbole(catalog, paths)
    return paths


SYNTHETIC_DIMS = {"text": 384, "image": 512}  # all-MiniLM-L6-v2 and CLIP ViT-B-32 widths
SYNTHETIC_SUFFIX = "-synthetic-features"


def scratch_params_path(catalog: str) -> Path:
    """The scratch params file for ``catalog``: ``data/bench/params-<catalog>.yaml``; for a
    ``<catalog>-synthetic-features`` twin (`synthetic_feature_catalog`), its base catalog's, whose data_dir holds it."""
    return BENCH / f"params-{catalog.removesuffix(SYNTHETIC_SUFFIX)}.yaml"


def synthetic_feature_catalog(catalog: str, paths: CatalogPaths, seed: int = 0) -> str:
    """A sibling catalog ``<catalog>-synthetic-features``: the same split (a symlink) plus text and image
    stores of random vectors at real encoder widths, so CAMMSR's epoch can be timed with all three
    modalities on a catalog that has no text or images. Timing only: the vectors carry no signal.
    """

    name = f"{catalog}{SYNTHETIC_SUFFIX}"
    twin = CatalogPaths.of(name, paths.root.parent)
    twin.root.mkdir(parents=True, exist_ok=True)
    if not twin.splits_dir.exists():
        twin.splits_dir.symlink_to(paths.splits_dir.resolve(), target_is_directory=True)
    items = load_splits(paths.splits_dir).item_ids
    rng = np.random.default_rng(seed)
    for modality, dim in SYNTHETIC_DIMS.items():
        store = twin.features_dir / f"{modality}.parquet"
        if not store.exists():
            write_rows(store, FeatureRows(list(items), ["synthetic"] * len(items),
                                          rng.standard_normal((len(items), dim), dtype=np.float32),
                                          {"modality": modality, "model": "synthetic random vectors (timing only)"}))
    run_split_features(name, twin)  # what training reads: the stores cut to the split
    return name


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    log.info("%s: done in %.0f s", what, time.perf_counter() - t0)


def thread_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_FIX}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra or {})})
    return env


def _cached(args, out: Path, cmd: list[str], env: dict[str, str], what: str) -> dict:
    """The JSON result at ``out``, running ``cmd`` (which writes it) first when it is missing or ``--rerun``."""
    if not out.exists() or args.rerun:
        _run(cmd, env, what)
    return json.loads(out.read_text())


def run_recbole(args, paths: CatalogPaths, seed: int, epochs: int, out: Path) -> dict:
    cmd = [str(args.recbole_python), str(REPO / "benchmarks" / "recbole_run.py"),
           "--data-path", str(export_dir(paths)), "--dataset", args.catalog, "--epochs", str(epochs),
           "--patience", str(args.patience), "--seed", str(seed), "--threads", str(args.threads),
           "--work-dir", str(out.parent / "recbole-work"), "--out", str(out)]
    return _cached(args, out, cmd, thread_env(args.threads, MALLOC_FIX), f"RecBole SASRec seed {seed}")


def run_ours(args, model: str, seed: int, epochs: int, batch: int, out: Path, catalog: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.ours_run", "--catalog", catalog or args.catalog,
           "--params", str(args.params),
           "--model", model, "--epochs", str(epochs), "--patience", str(args.patience), "--seed", str(seed),
           "--threads", str(args.threads), "--batch-size", str(batch), "--batch-targets", str(args.batch_targets),
           "--run-dir", str(out.with_suffix("")),
           "--out", str(out)]
    return _cached(args, out, cmd, thread_env(args.threads), f"our {model} seed {seed}")


def run_flops(args, model: str, batch: int, out: Path, catalog: str | None = None) -> dict:
    """`benchmarks.flops` for ``model`` on the first training batches of this benchmark's batching."""
    cmd = [sys.executable, "-m", "benchmarks.flops", "--catalog", catalog or args.catalog,
           "--params", str(args.params), "--model", model, "--threads", str(args.threads),
           "--batch-size", str(batch), "--batch-targets", str(args.batch_targets), "--out", str(out)]
    return _cached(args, out, cmd, thread_env(args.threads), f"matmul FLOPs of our {model}")


def epoch_stats(run: dict, targets: int) -> dict:
    """Median and best (min) wall/CPU seconds of a run's training epochs and validation passes.

    On a shared machine other work only ever adds time, so the best epoch is the closest to the
    undisturbed cost: the speedups use it, and the table shows the medians beside it.
    """
    tr, va = run["train_epochs"], run["valid_passes"]
    best, best_eval = min(e["wall_s"] for e in tr), min(e["wall_s"] for e in va)
    return {"epoch_s": median(e["wall_s"] for e in tr), "epoch_best_s": best,
            "epoch_cpu_s": median(e["cpu_s"] for e in tr), "epoch_cpu_best_s": min(e["cpu_s"] for e in tr),
            "targets_per_s": targets / best, "eval_s": median(e["wall_s"] for e in va), "eval_best_s": best_eval,
            "eval_users_per_s": run["valid_users"] / best_eval}


def _ms(values: list[float]) -> str:
    return f"{mean(values):.4f} ± {stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default="toys")
    ap.add_argument("--params", type=Path, default=None, help="params file defining the catalog "
                    "(default: a scratch data/bench/params-<catalog>.yaml for toys or scientific)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds for the accuracy runs")
    ap.add_argument("--epochs", type=int, default=2, help="epoch cap of every run (RecBole needs ~40 to converge)")
    ap.add_argument("--patience", type=int, default=10, help="early stopping on valid NDCG@10 (RecBole default 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-targets", type=int, default=2048, help="targets per optimizer step (RecBole: 2048)")
    ap.add_argument("--quick", action="store_true", help="1 epoch, seed 0")
    ap.add_argument("--skip-cammsr", action="store_true")
    ap.add_argument("--cammsr-synthetic-features", action=argparse.BooleanOptionalAction, default=True,
                    help="also time CAMMSR with id+text+image on random 384/512-d feature stores "
                         "(what a multimodal catalog costs, measured on catalogs without text or images, like toys)")
    ap.add_argument("--recbole-python", type=Path, default=Path(".venv-recbole/bin/python"))
    ap.add_argument("--out-dir", type=Path, default=BENCH / "vs_recbole")
    ap.add_argument("--rerun", action="store_true", help="ignore cached run results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.epochs, args.seeds = 1, "0"
    if not args.recbole_python.exists():
        raise SystemExit(f"{args.recbole_python}: no RecBole venv; run `bash benchmarks/setup_recbole.sh` first")
    args.params = args.params or scratch_params(scratch_params_path(args.catalog), args.catalog)
    seeds = [int(s) for s in args.seeds.split(",")]

    paths = prepare(args.catalog, args.params)
    split = load_splits(paths.splits_dir)
    train_lens = np.array([len(s) for s in split.train_sequences()])
    seqs, targets = int((train_lens >= 2).sum()), int(np.clip(train_lens - 1, 0, None).sum())
    batch = max(1, round(args.batch_targets * seqs / targets))
    tag = f"e{args.epochs}-p{args.patience}-t{args.threads}"
    out = args.out_dir / args.catalog

    bt = f"bt{args.batch_targets}"
    ours = {s: run_ours(args, "sasrec", s, args.epochs, batch, out / f"sasrec-s{s}-{tag}-{bt}.json") for s in seeds}
    cammsr = None if args.skip_cammsr else run_ours(args, "cammsr", seeds[0], min(args.epochs, 2), batch,
                                                     out / f"cammsr-s{seeds[0]}-e{min(args.epochs, 2)}-{bt}.json")
    cammsr_mm = None
    if args.cammsr_synthetic_features and not args.skip_cammsr:
        twin = synthetic_feature_catalog(args.catalog, paths)
        cammsr_mm = run_ours(args, "cammsr", seeds[0], min(args.epochs, 2), batch,
                             out / f"cammsr-synthetic-s{seeds[0]}-e{min(args.epochs, 2)}-{bt}.json", twin)
    # the same first batches for both: the matmul arithmetic of CAMMSR with text + image over SASRec's
    flop_ratio = None
    if cammsr_mm:
        f_sasrec = run_flops(args, "sasrec", batch, out / f"flops-sasrec-{bt}.json")
        f_mm = run_flops(args, "cammsr", batch, out / f"flops-cammsr-synthetic-{bt}.json", twin)
        flop_ratio = f_mm["flops_per_target"] / f_sasrec["flops_per_target"]
    rb = {s: run_recbole(args, paths, s, args.epochs, out / f"recbole-s{s}-{tag}.json") for s in seeds}

    r0, o0 = rb[seeds[0]], ours[seeds[0]]
    checks = [check_targets(split, "test", dict(zip(r0["test"]["users"], r0["test"]["targets"], strict=True)),
                            50, dict(zip(r0["test"]["users"], r0["test"]["histories"], strict=True))),
              check_targets(split, "valid", dict(zip(r0["valid"]["users"], r0["valid"]["targets"], strict=True)))]
    rs, os_ = epoch_stats(r0, r0["train_targets"]), epoch_stats(o0, o0["train_targets"])
    cs = epoch_stats(cammsr, cammsr["train_targets"]) if cammsr else None
    cms = epoch_stats(cammsr_mm, cammsr_mm["train_targets"]) if cammsr_mm else None

    def acc(side: str, key: str, metric: str) -> list[float]:
        if side == "recbole":
            return [rb[s]["recbole_test"][metric] if key == "recbole" else rb[s]["our_ranker_test"][key][metric]
                    for s in seeds]
        return [ours[s]["test"][key][metric] for s in seeds]

    rows = [
        ("training targets / epoch", f"{r0['train_targets']} prefixes", f"{o0['train_targets']} positions in "
         f"{o0['train_sequences']} sequences"),
        ("optimizer steps / epoch (batch)", f"{r0['steps_per_epoch']} (2048 prefixes)",
         f"{o0['steps_per_epoch']} (<= {args.batch_targets} targets)"),
        ("epoch wall s, best / median", f"{rs['epoch_best_s']:.1f} / {rs['epoch_s']:.1f}",
         f"{os_['epoch_best_s']:.1f} / {os_['epoch_s']:.1f}"),
        ("epoch CPU s, best / median", f"{rs['epoch_cpu_best_s']:.1f} / {rs['epoch_cpu_s']:.1f}",
         f"{os_['epoch_cpu_best_s']:.1f} / {os_['epoch_cpu_s']:.1f}"),
        ("training targets / s (best epoch)", f"{rs['targets_per_s']:.0f}", f"{os_['targets_per_s']:.0f}"),
        ("full-ranking valid pass s, best / median", f"{rs['eval_best_s']:.2f} / {rs['eval_s']:.2f}",
         f"{os_['eval_best_s']:.2f} / {os_['eval_s']:.2f}"),
        ("eval users / s (best pass)", f"{rs['eval_users_per_s']:.0f}", f"{os_['eval_users_per_s']:.0f}"),
        ("peak RSS MB", f"{r0['peak_rss_mb']:.0f}", f"{o0['peak_rss_mb']:.0f}"),
        (f"test NDCG@10, unmasked ({len(seeds)} seeds)", _ms(acc("recbole", "recbole", "ndcg@10")) + " (RecBole's)",
         _ms(acc("ours", "unmasked", "ndcg@10"))),
        ("test HR@10, unmasked", _ms(acc("recbole", "recbole", "hit@10")) + " (RecBole's)",
         _ms(acc("ours", "unmasked", "hr@10"))),
        ("test NDCG@10, unmasked, our ranker", _ms(acc("recbole", "unmasked", "ndcg@10")),
         _ms(acc("ours", "unmasked", "ndcg@10"))),
        ("test NDCG@10, history masked, our ranker", _ms(acc("recbole", "masked", "ndcg@10")),
         _ms(acc("ours", "masked", "ndcg@10"))),
        ("test HR@10, history masked, our ranker", _ms(acc("recbole", "masked", "hr@10")),
         _ms(acc("ours", "masked", "hr@10"))),
        ("epochs run (cap) / best epoch", f"{r0['epochs_run']} ({args.epochs})",
         f"{o0['epochs_run']} ({args.epochs}) / {o0['best_epoch']}"),
    ]
    if cs:
        rows.append(("CAMMSR best epoch s / ÷ SASRec's", f"modalities {'+'.join(cammsr['modalities'])}",
                     f"{cs['epoch_best_s']:.1f} / {cs['epoch_best_s'] / os_['epoch_best_s']:.2f}x"))
        rows.append(("CAMMSR peak RSS MB", "", f"{cammsr['peak_rss_mb']:.0f}"))
    if cms:
        rows.append(("CAMMSR, synthetic text+image, best epoch s / ÷",
                     f"modalities {'+'.join(cammsr_mm['modalities'])}",
                     f"{cms['epoch_best_s']:.1f} / {cms['epoch_best_s'] / os_['epoch_best_s']:.2f}x"))
        rows.append(("CAMMSR, synthetic text+image, peak RSS MB", "", f"{cammsr_mm['peak_rss_mb']:.0f}"))
        rows.append(("CAMMSR, synthetic text+image, matmul FLOPs ÷ SASRec's", "same batches",
                     f"{flop_ratio:.2f}x"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{args.catalog}: {split.num_items} items, {len(split.sequences)} users; {args.threads} threads, CPU; "
          f"RecBole {r0['torch']} with anomaly detection {'ON' if r0['anomaly_detection'] else 'off'} "
          f"(was {'on' if r0['anomaly_detection_after_import'] else 'off'} after import), malloc env "
          f"{r0['malloc_env']}; epochs capped at {args.epochs}")
    print(f"{'':{width}}  {'RecBole SASRec':>34}  {'ours SASRec':>34}")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>34}  {b:>34}")
    for c in checks:
        print(f"targets check ({c.part}): {'OK' if c.ok else 'MISMATCH'}, ours {c.ours} users, RecBole {c.theirs}, "
              f"{c.mismatch_count} mismatches {c.mismatches[:3]}")
    result = {
        "catalog": args.catalog, "threads": args.threads, "epochs_cap": args.epochs, "seeds": seeds,
        "train_speedup": round(os_["targets_per_s"] / rs["targets_per_s"], 2),
        "train_speedup_cpu": round((o0["train_targets"] / os_["epoch_cpu_best_s"])
                                   / (r0["train_targets"] / rs["epoch_cpu_best_s"]), 2),
        "train_speedup_median": round((o0["train_targets"] / os_["epoch_s"]) / (r0["train_targets"] / rs["epoch_s"]),
                                      2),
        "eval_speedup": round(os_["eval_users_per_s"] / rs["eval_users_per_s"], 2),
        "ndcg10_ours": round(mean(acc("ours", "unmasked", "ndcg@10")), 5),
        "ndcg10_recbole": round(mean(acc("recbole", "recbole", "ndcg@10")), 5),
        "ndcg10_ours_masked": round(mean(acc("ours", "masked", "ndcg@10")), 5),
        "ndcg10_recbole_masked": round(mean(acc("recbole", "masked", "ndcg@10")), 5),
        "hr10_ours": round(mean(acc("ours", "unmasked", "hr@10")), 5),
        "hr10_recbole": round(mean(acc("recbole", "recbole", "hit@10")), 5),
        "cammsr_over_sasrec_epoch": round(cs["epoch_best_s"] / os_["epoch_best_s"], 2) if cs else None,
        "cammsr_modalities": cammsr["modalities"] if cammsr else None,
        "cammsr_synthetic_mm_over_sasrec_epoch": round(cms["epoch_best_s"] / os_["epoch_best_s"], 2) if cms else None,
        # CAMMSR with id + text + image at the real widths (384, 512) over our SASRec's epoch
        "cammsr_mm_over_sasrec_epoch": round(cms["epoch_best_s"] / os_["epoch_best_s"], 2) if cms else None,
        # the same two models' matmul FLOPs per training target (benchmarks.flops): the epoch ratio's floor
        "cammsr_mm_flop_ratio": round(flop_ratio, 2) if flop_ratio else None,
        "peak_rss_ratio": round(o0["peak_rss_mb"] / r0["peak_rss_mb"], 3),  # ours / RecBole, SASRec both sides
        "epoch_best_s_recbole": round(rs["epoch_best_s"], 2), "epoch_best_s_ours": round(os_["epoch_best_s"], 2),
        "epoch_median_s_recbole": round(rs["epoch_s"], 2), "epoch_median_s_ours": round(os_["epoch_s"], 2),
        "peak_rss_mb_recbole": round(r0["peak_rss_mb"]), "peak_rss_mb_ours": round(o0["peak_rss_mb"]),
        "peak_rss_mb_cammsr": round(cammsr["peak_rss_mb"]) if cammsr else None,
        "targets_match": all(c.ok for c in checks),
        "machine": machine.describe(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
