"""The evaluate stage: full-ranking test metrics of the trained model beside untrained baselines (most-popular,
and content kNN where the catalog has text or image features: `cammsr.evaluate.baselines`).

Writes ``metrics.json`` (DVC metrics: valid and test, the test also under the other history-masking
protocol, and test NDCG/HR@10 by the target's training popularity: head, torso, tail), ``eval/per_category.csv``
(test metrics by the target's category) and ``eval/modality_weights.csv`` + ``.png`` (mean learned
modality weights per category).
"""

from __future__ import annotations

import logging
import time

import matplotlib
import numpy as np
import polars as pl
import torch

from cammsr.core.atomic import atomic_path, write_json_atomic
from cammsr.core.config import EvaluateParams, ProjectParams, SplitParams
from cammsr.core.device import pick_device, resolve_precision
from cammsr.core.malloc import tune_glibc_malloc
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.data.splits import SplitData, load_splits
from cammsr.evaluate.baselines import baseline_rankers, best_fusion_beta, label, late_fusion, remembered
from cammsr.evaluate.buckets import bucket_metrics, popularity_buckets, training_counts
from cammsr.evaluate.metrics import metrics_from_ranks
from cammsr.evaluate.ranking import ScoreFn, model_scores, rank_targets, rank_targets_by_protocol
from cammsr.model import CAMMSR
from cammsr.model.io import load_checkpoint

matplotlib.use("Agg")
log = logging.getLogger(__name__)
# what metrics.json holds; `cammsr experiments` re-evaluates a finished run whose metrics are older
EVALUATION_VERSION = 2  # 2: content kNN baselines and the model's late fusion with them
SUMMARY_K = 10  # the cut-off of the per-category and per-popularity tables and of the fusion weight's pick


def per_category(split: SplitData, targets: np.ndarray, ranks: dict[str, np.ndarray], k: int = SUMMARY_K
                 ) -> pl.DataFrame:
    """Test HR@k and NDCG@k of each ranker, grouped by the target item's category."""
    cats = split.item_category[targets]
    rows = []
    for c, name in enumerate(split.category_names):
        sel = cats == c
        if not sel.any():
            continue
        row: dict[str, object] = {"category": name, "users": int(sel.sum())}
        for ranker, r in ranks.items():
            m = metrics_from_ranks(r[sel], [k])
            row[f"{ranker}_hr@{k}"] = round(m[f"hr@{k}"], 4)
            row[f"{ranker}_ndcg@{k}"] = round(m[f"ndcg@{k}"], 4)
        rows.append(row)
    return pl.DataFrame(rows)


@torch.no_grad()
def modality_weights_by_category(model: CAMMSR, split: SplitData, device: torch.device) -> pl.DataFrame | None:
    """Mean learned modality weights w_m over the items of each (true) category; None without CAMoE."""
    if not model.use_moe or len(model.mods) < 2:
        return None
    model.eval()
    items = torch.arange(1, split.num_items + 1, device=device)
    _, w, _ = model.camoe(items)  # [N, M]
    df = pl.DataFrame({"category": [split.category_names[c] for c in split.item_category[1:]]})
    df = df.with_columns([pl.Series(f"w_{m}", w[:, j].float().cpu().numpy()) for j, m in enumerate(model.mods)])
    return df.group_by("category").agg(pl.len().alias("items"), pl.selectors.starts_with("w_").mean()).sort("category")


def plot_weights(df: pl.DataFrame, path) -> None:
    """Stacked bars: the share of each modality in each category's refined representation."""
    import matplotlib.pyplot as plt

    cols = [c for c in df.columns if c.startswith("w_")]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * df.height + 2), 3.5))
    bottom = np.zeros(df.height)
    for c in cols:
        vals = df[c].to_numpy()
        ax.bar(df["category"].to_list(), vals, bottom=bottom, label=c[2:])
        bottom += vals
    ax.set_ylabel("mean modality weight")
    ax.set_title("CAMMSR: learned modality weights per category")
    ax.legend(loc="upper right", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def rank_cap(params: EvaluateParams) -> int:
    """The deepest rank any metric here reads (params.ks; per category, per popularity bucket and for the fusion
    weight, NDCG@10): ranks at or past it are all alike to them."""
    return max([*params.ks, SUMMARY_K])


def rank_parts(rankers: dict[str, ScoreFn], split: SplitData, split_params: SplitParams, params: EvaluateParams,
               device: torch.device, precision: torch.dtype
               ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, np.ndarray]]:
    """Valid and test metrics of each ranker (``{ranker: {part: {metric: value}}}``; the test also under the
    other history-masking protocol, as ``test_history_masked``/``_unmasked``) and its test ranks under the
    configured protocol."""
    results: dict[str, dict[str, dict[str, float]]] = {r: {} for r in rankers}
    test_ranks: dict[str, np.ndarray] = {}
    for part in ("valid", "test"):
        hist, targets, _ = split.held_out(part, split_params.max_seq_len)
        # test: both protocols from one scoring pass (the configured one is "test", the other beside it)
        masks = (params.mask_history,) if part == "valid" else (False, True)
        for ranker, fn in rankers.items():
            ranks = rank_targets_by_protocol(fn, hist, targets, params.batch_size, masks, device, precision,
                                             rank_cap(params))
            for mask, r in ranks.items():
                key = part if mask == params.mask_history else f"{part}_history_{'masked' if mask else 'unmasked'}"
                results[ranker][key] = {k: round(v, 6) for k, v in metrics_from_ranks(r, params.ks).items()}
            if part == "test":
                test_ranks[ranker] = ranks[params.mask_history]
    return results, test_ranks


def run_evaluate(name: str, split_params: SplitParams, params: EvaluateParams, project: ProjectParams,
                 paths: CatalogPaths) -> StageSummary:
    """Test (and valid) metrics for the best checkpoint and for the untrained baselines on the same split."""
    t0 = time.perf_counter()
    tune_glibc_malloc()  # score matrices of every batch are reused, not page-faulted in again
    device = pick_device(project.device)
    split = load_splits(paths.splits_dir)
    model, ckpt = load_checkpoint(paths.checkpoint, split, paths, map_location=device)
    model.to(device).eval()
    precision = resolve_precision(params.precision, device, auto_on=("cpu",))  # ranks are exact either way
    # the model's user vectors are remembered: its late fusions (every weight tried) reuse them
    rankers = {"model": remembered(model_scores(model)), **baseline_rankers(split, paths)}
    betas = {}  # late fusion of the model with each content kNN, its weight picked on validation
    hist, targets, _ = split.held_out("valid", split_params.max_seq_len)
    for knn in [r for r in rankers if r.endswith("_knn")]:
        betas[f"model+{knn}"], _ = best_fusion_beta(rankers["model"], rankers[knn], lambda fn: rank_targets(
            fn, hist, targets, params.batch_size, params.mask_history, device, precision, rank_cap(params)),
            k=SUMMARY_K)
        rankers[f"model+{knn}"] = late_fusion(rankers["model"], rankers[knn], betas[f"model+{knn}"])
    results, test_ranks = rank_parts(rankers, split, split_params, params, device, precision)
    _, test_targets, _ = split.held_out("test", split_params.max_seq_len)
    labels = popularity_buckets(training_counts(split.train_sequences(), split.num_items))
    metrics = {**results, "by_target_popularity": bucket_metrics(test_ranks, test_targets, labels, (SUMMARY_K,)),
               "model_name": ckpt.get("model_name", "?"), "users": len(test_targets),
               "items": split.num_items, "best_epoch": int(ckpt.get("epoch", -1)), "mask_history": params.mask_history,
               "fusion_beta": betas, "evaluation_version": EVALUATION_VERSION}
    write_json_atomic(paths.metrics, metrics)

    paths.eval_dir.mkdir(parents=True, exist_ok=True)
    cat_table = per_category(split, test_targets, test_ranks)
    with atomic_path(paths.eval_dir / "per_category.csv", suffix=".csv") as tmp:
        cat_table.write_csv(tmp)
    weights = modality_weights_by_category(model, split, device)
    notes = []
    if weights is not None:
        with atomic_path(paths.eval_dir / "modality_weights.csv", suffix=".csv") as tmp:
            weights.write_csv(tmp)
        plot_weights(weights, paths.eval_dir / "modality_weights.png")
        cols = [c for c in weights.columns if c.startswith("w_")]
        per_cat = [f"{row['category']}: " + " ".join(f"{c[2:]} {row[c]:.2f}" for c in cols)
                   for row in weights.iter_rows(named=True)]
        notes.append("mean modality weights per category: " + "; ".join(per_cat))
    model_name = str(ckpt.get("model_name", "model"))
    tail = metrics["by_target_popularity"]["tail"]
    if tail["users"]:
        notes.append(f"tail targets (seen < 5 times in training, {tail['users']} users): NDCG@10 "
                     + ", ".join(f"{label(r, model_name)} {tail[r]['ndcg@10']:.4f}" for r in rankers))
    for ranker in rankers:
        if ranker.endswith("_knn"):
            beta = f" (weight {betas[ranker]:g}, picked on validation)" if ranker in betas else ""
            notes.append(f"{label(ranker, model_name)}{beta}: test NDCG@10 {results[ranker]['test']['ndcg@10']:.4f}")
    m, p = results["model"]["test"], results["popularity"]["test"]
    summary = StageSummary(
        stage="evaluate", catalog=name,
        counts={"model": ckpt.get("model_name", "?"),
                "users": len(test_targets), "test_ndcg@10": round(m["ndcg@10"], 4),
                "test_hr@10": round(m["hr@10"], 4), "pop_ndcg@10": round(p["ndcg@10"], 4),
                "pop_hr@10": round(p["hr@10"], 4)},
        seconds=time.perf_counter() - t0, notes=notes,
    )
    summary.write(paths.summary("evaluate"))
    return summary
