"""Metrics tables: the model beside most-popular, for one catalog or all of them."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

METRIC_ORDER = ("hr", "ndcg", "mrr")


def metrics_table(catalog: str, metrics_path: Path, part: str = "test") -> Table:
    """A rich table with one row per ranker (model, popularity) and HR/NDCG/MRR @k columns."""
    metrics = json.loads(Path(metrics_path).read_text())
    model_name = metrics.get("model_name", "model")
    keys = sorted(metrics["model"][part], key=lambda k: (METRIC_ORDER.index(k.split("@")[0]), int(k.split("@")[1])))
    table = Table(title=f"{catalog}: {part} ({metrics['users']} users, {metrics['items']} items, full ranking, "
                        f"history {'masked' if metrics.get('mask_history') else 'not masked'})")
    table.add_column("ranker")
    for k in keys:
        table.add_column(k.upper().replace("@", "@"), justify="right")
    for ranker, label in (("model", model_name), ("popularity", "most-popular")):
        table.add_row(label, *[f"{metrics[ranker][part][k]:.4f}" for k in keys])
    return table


def markdown_table(catalog: str, metrics_path: Path, part: str = "test") -> str:
    """The same table as markdown (for Prefect artifacts and reports)."""
    metrics = json.loads(Path(metrics_path).read_text())
    keys = list(metrics["model"][part])
    lines = [f"| {catalog} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for ranker, label in (("model", metrics.get("model_name", "model")), ("popularity", "most-popular")):
        lines.append(f"| {label} | " + " | ".join(f"{metrics[ranker][part][k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)
