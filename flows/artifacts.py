"""The markdown every flow run publishes: what each stage did, then the catalog's metrics table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from cammsr.core.summary import StageSummary
from cammsr.evaluate.report import markdown_table
from cammsr.ops.dvc_sync import StageOutcome

MAX_COUNTS_CHARS = 300  # one table cell; the full counts are in the stage's summary JSON


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MAX_COUNTS_CHARS else text[: MAX_COUNTS_CHARS - 3] + "..."


def run_markdown(title: str, outcomes: Sequence[StageOutcome | StageSummary], metrics_path: Path | None = None,
                 extra: Sequence[str] = ()) -> str:
    """A markdown report: a table of stages (ran / up to date, counts, seconds), notes, then metrics.

    Args:
        title: the heading (e.g. ``pipeline: demo``).
        outcomes: stages in the order they ran (`StageOutcome`), or plain summaries (extra steps).
        metrics_path: the catalog's metrics.json; the table beside most-popular is added when it exists.
        extra: markdown lines added before the metrics (e.g. an onboarding's source report).
    """
    lines = [f"# {title}", "", "| stage | status | counts | seconds |", "|---|---|---|---|"]
    notes: list[str] = []
    for item in outcomes:
        summary, skipped = (item.summary, item.skipped) if isinstance(item, StageOutcome) else (item, False)
        counts = " ".join(f"{k}={v}" for k, v in summary.counts.items())
        status = "up to date (dvc.lock)" if skipped else "ran"
        lines.append(f"| {summary.stage} | {status} | {_cell(counts)} | {summary.seconds:.1f} |")
        notes += [f"- {summary.stage}: {n}" for n in summary.notes[:5] if not skipped]
    if notes:
        lines += ["", "## Notes", "", *notes]
    if extra:
        lines += ["", *extra]
    if metrics_path is not None and Path(metrics_path).is_file():
        lines += ["", "## Test metrics (full ranking)", "", markdown_table(title.split(": ")[-1], metrics_path)]
    return "\n".join(lines)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish(key: str, markdown: str, description: str) -> None:
    """Publish ``markdown`` as a Prefect artifact of the current flow run."""
    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)
