"""Stage summaries: every stage returns one, every driver (CLI, DVC, Prefect, tests) prints it."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cammsr.core.atomic import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class StageSummary:
    """What a stage produced: counts by name, wall seconds, free-form notes."""

    stage: str
    catalog: str
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One human line, e.g. ``ingest[demo] interactions=7012 quarantined=2 ... (3.1 s)``."""
        parts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"{self.stage}[{self.catalog}] {parts} ({self.seconds:.1f} s)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())
        log.info(self.line())
        for note in self.notes:
            log.info("  %s", note)
