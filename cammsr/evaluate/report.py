"""Metrics tables: the model beside most-popular, for one catalog or all of them."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

METRIC_ORDER = ("hr", "ndcg", "mrr")


def _ordered_keys(part_metrics: dict) -> list[str]:
    return sorted(part_metrics, key=lambda k: (METRIC_ORDER.index(k.split("@")[0]), int(k.split("@")[1])))


def metrics_table(catalog: str, metrics_path: Path, part: str = "test") -> Table:
    """A rich table, one row per metric (HR/NDCG/MRR @k), the model beside most-popular and the lift."""
    metrics = json.loads(Path(metrics_path).read_text())
    model_name = metrics.get("model_name", "model")
    table = Table(title=f"{catalog}: {part}, {metrics['users']} users x {metrics['items']} items, full ranking, "
                        f"history {'masked' if metrics.get('mask_history') else 'not masked'}")
    table.add_column("metric")
    table.add_column(model_name, justify="right")
    table.add_column("most-popular", justify="right")
    table.add_column("lift", justify="right")
    for k in _ordered_keys(metrics["model"][part]):
        m, p = metrics["model"][part][k], metrics["popularity"][part][k]
        lift = f"{m / p:.2f}x" if p > 0 else "-"
        table.add_row(k.upper(), f"{m:.4f}", f"{p:.4f}", lift)
    return table


def markdown_table(catalog: str, metrics_path: Path, part: str = "test") -> str:
    """The same table as markdown (for Prefect artifacts and reports)."""
    metrics = json.loads(Path(metrics_path).read_text())
    keys = _ordered_keys(metrics["model"][part])
    lines = [f"| {catalog} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for ranker, label in (("model", metrics.get("model_name", "model")), ("popularity", "most-popular")):
        lines.append(f"| {label} | " + " | ".join(f"{metrics[ranker][part][k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)
