"""The quarantine: records that could not be parsed, kept with file, line and reason instead of stopping.

``quarantine.jsonl`` holds one object per bad record::

    {"file": "raw/1f0c...-reviews_Demo_5.json.gz", "line": 17, "reason": "missing reviewerID", "raw": "{..."}

It is streamed to a temp file and renamed into place on close (also when the stage then fails, so
the user can look), and a ceiling (`check_fraction`) turns "a few bad lines" into "this file is wrong".
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from cammsr.core.atomic import atomic_path
from cammsr.core.errors import BadInput

log = logging.getLogger(__name__)

RAW_CHARS = 500  # enough of a line to recognise it, bounded so a junk file cannot blow up the quarantine


@dataclass(frozen=True)
class QuarantineRecord:
    file: str
    line: int
    reason: str
    raw: str


class QuarantineLimitError(BadInput, ValueError):
    """More than ``max_quarantine_fraction`` of a file's records were malformed."""


class Quarantine:
    """Collects malformed records; with a ``target`` they stream to that JSONL file, else stay in memory.

    Use as a context manager: on exit the file is renamed into place (even on error).
    """

    def __init__(self, target: Path | None = None, raw_chars: int = RAW_CHARS) -> None:
        self.target = target
        self.raw_chars = raw_chars
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}  # file -> "line N: reason" of its first quarantined record
        self.records: list[QuarantineRecord] = []  # only without a target (tests, previews)
        self._stack = contextlib.ExitStack()
        self._fh: IO[str] | None = None

    def __enter__(self) -> Quarantine:
        if self.target is not None:
            tmp = self._stack.enter_context(atomic_path(self.target))
            self._fh = self._stack.enter_context(open(tmp, "w", encoding="utf-8"))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Finish the file (rename into place). Safe to call twice."""
        self._stack.close()
        self._fh = None

    def add(self, file: str, line: int, reason: str, raw: bytes | str) -> None:
        """Record that ``file`` line ``line`` (1-based) was not used, and why."""
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        record = QuarantineRecord(file, line, reason, text[: self.raw_chars])
        self.counts[file] += 1
        self.first.setdefault(file, f"line {line}: {reason}")
        if self.counts[file] <= 3:
            log.warning("quarantined %s:%d: %s", file, line, reason)
        if self._fh is not None:
            self._fh.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        elif self.target is None:
            self.records.append(record)
        else:
            raise RuntimeError(f"quarantine {self.target} is not open (use it as a context manager)")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def check_fraction(counts: Counter[str] | dict[str, int], lines: dict[str, int], max_fraction: float,
                   where: Path | str, first: dict[str, str] | None = None) -> None:
    """Raise when any file's quarantined / records exceeds ``max_fraction``.

    Args:
        counts: quarantined records per file (`Quarantine.counts`).
        lines: records (non-blank lines) read per file.
        max_fraction: the ceiling, ``IngestParams.max_quarantine_fraction``.
        where: the quarantine file, named in the error so the user knows where to look.
        first: the first problem of each file (`Quarantine.first`), quoted in the error.
    """
    for file, total in lines.items():
        bad = counts.get(file, 0)
        if total and bad / total > max_fraction:
            example = f" (first: {first[file]})" if first and file in first else ""
            raise QuarantineLimitError(
                f"{file}: {bad} of {total} records quarantined ({bad / total:.2%}){example}, more than "
                f"ingest.max_quarantine_fraction={max_fraction:g}; see {where} for each line and reason"
            )
