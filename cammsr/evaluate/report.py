"""Metrics tables: the model beside the untrained baselines, for one catalog or all of them."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from cammsr.evaluate.baselines import label

METRIC_ORDER = ("hr", "ndcg", "mrr")


def _ordered_keys(part_metrics: dict) -> list[str]:
    return sorted(part_metrics, key=lambda k: (METRIC_ORDER.index(k.split("@")[0]), int(k.split("@")[1])))


RANKER_ORDER = ("model", "popularity", "text_knn", "image_knn", "model+text_knn", "model+image_knn")


def _rankers(metrics: dict) -> list[str]:
    """The ranker keys of a metrics.json: the model, most-popular, the content kNN, the late fusions (others last)."""
    keys = [k for k in metrics if isinstance(metrics[k], dict) and "test" in metrics[k]]
    return sorted(keys, key=lambda k: RANKER_ORDER.index(k) if k in RANKER_ORDER else len(RANKER_ORDER))


def metrics_table(catalog: str, metrics_path: Path, part: str = "test") -> Table:
    """A rich table, one row per metric (HR/NDCG/MRR @k): the model, its lift over most-popular, and the
    other untrained baselines (content kNN) where the catalog has them."""
    metrics = json.loads(Path(metrics_path).read_text())
    model_name = metrics.get("model_name", "model")
    others = [r for r in _rankers(metrics) if r not in ("model", "popularity")]
    table = Table(title=f"{catalog}: {part}, {metrics['users']} users x {metrics['items']} items, full ranking, "
                        f"history {'masked' if metrics.get('mask_history') else 'not masked'}")
    table.add_column("metric")
    table.add_column(model_name, justify="right")
    table.add_column("most-popular", justify="right")
    table.add_column("lift", justify="right")
    for r in others:
        table.add_column(label(r, model_name), justify="right")
    for k in _ordered_keys(metrics["model"][part]):
        m, p = metrics["model"][part][k], metrics["popularity"][part][k]
        lift = f"{m / p:.2f}x" if p > 0 else "-"
        table.add_row(k.upper(), f"{m:.4f}", f"{p:.4f}", lift, *(f"{metrics[r][part][k]:.4f}" for r in others))
    return table


def markdown_table(catalog: str, metrics_path: Path, part: str = "test") -> str:
    """The model and each baseline as markdown rows (for Prefect artifacts and reports)."""
    metrics = json.loads(Path(metrics_path).read_text())
    keys = _ordered_keys(metrics["model"][part])
    lines = [f"| {catalog} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for ranker in _rankers(metrics):
        lines.append(f"| {label(ranker, metrics.get('model_name', 'model'))} | "
                     + " | ".join(f"{metrics[ranker][part][k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def example_users(paths, n: int = 3, last: int = 3, top: int = 5) -> list[dict]:
    """``n`` users spread over the recommendations file (by user id), each with the titles of their last
    ``last`` items and of their ``top`` recommendations (with scores); items without a title show their id."""
    import numpy as np
    import polars as pl

    from cammsr.data.splits import load_splits

    recs = pl.read_parquet(paths.recommendations)
    if recs.is_empty():
        return []
    meta = pl.read_parquet(paths.items, columns=["item_id", "title"]).unique("item_id", keep="first")
    title = dict(zip(meta["item_id"].to_list(), meta["title"].to_list(), strict=True))
    split = load_splits(paths.splits_dir)
    row_of = {u: i for i, u in enumerate(split.user_ids)}
    users = sorted(recs["user_id"].unique().to_list())
    picks = [users[int(i)] for i in np.unique(np.linspace(0, len(users) - 1, num=min(n, len(users))).round())]
    out = []
    for user in picks:
        history = [split.item_ids[i - 1] for i in split.sequences[row_of[user]][-last:]]
        mine = recs.filter((pl.col("user_id") == user) & (pl.col("rank") <= top)).sort("rank")
        top_items = zip(mine["item_id"].to_list(), mine["score"].to_list(), strict=True)
        out.append({"user_id": user, "last_items": [title.get(i) or i for i in history],
                    "top": [(title.get(i) or i, float(s)) for i, s in top_items]})
    return out


def examples_table(catalog: str, examples: list[dict]) -> Table:
    """A rich table of `example_users`: one row per user, their last items and their top items."""
    table = Table(title=f"{catalog}: example recommendations (last items -> top {len(examples[0]['top'])})"
                  if examples else f"{catalog}: no recommendations")
    table.add_column("user")
    table.add_column("last items (oldest first)")
    table.add_column("recommended (score)")
    for ex in examples:
        table.add_row(ex["user_id"], "\n".join(ex["last_items"]),
                      "\n".join(f"{r}. {t} ({s:.2f})" for r, (t, s) in enumerate(ex["top"], start=1)))
    return table
