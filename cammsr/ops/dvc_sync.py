"""Keep dvc.lock the one record of finished work, whoever runs a stage (DVC, Prefect, a test).

The mechanism (see docs/ORCHESTRATION.md): a driver other than `dvc repro` wraps each stage call in
`DvcSync.run`, which

1. asks DVC whether the stage (``ingest@demo``, ``demo_source``...) is up to date, exactly as
   ``dvc status ingest@demo`` would; if it is, the stage function is not called and its last summary
   (``summaries/<stage>.json``) is returned instead;
2. otherwise calls the stage function, then records its outputs with ``dvc commit -f <target>`` (the
   command, run in the project root), so dvc.lock holds what ``dvc repro`` would have written (deps,
   params, outs and their hashes);
3. checks that DVC now sees the stage as up to date.

So a ``dvc repro`` right after a Prefect run has nothing to do, and a Prefect run right after
``dvc repro`` calls no stage function. DVC's Repo API is not thread-safe and its repo lock is
per process, so every DVC call goes through one lock: a thread lock within the process and a file
lock across processes (Dask workers). Only DVC's public interface is used: `dvc.repo.Repo.status`
and the ``dvc commit`` command.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from cammsr.core.summary import StageSummary

log = logging.getLogger(__name__)

_THREAD_LOCK = threading.RLock()
LOCK_NAME = "cammsr-dvc-sync.lock"  # under .dvc/tmp, beside DVC's own lock files


class DvcSyncError(RuntimeError):
    """DVC and the workspace disagree in a way a rerun will not fix; the message names the stage."""


@dataclass
class StageOutcome:
    """A stage as a driver saw it: ``skipped`` when dvc.lock said it was up to date."""

    target: str
    summary: StageSummary
    skipped: bool
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary.to_dict(), "target": self.target, "skipped": self.skipped}

    def line(self) -> str:
        return f"{self.target}: up to date in dvc.lock, not rerun" if self.skipped else self.summary.line()


@dataclass
class DvcSync:
    """The DVC project at ``root``; ``enabled`` is False where there is none (then nothing is checked).

    Example:
        >>> sync = DvcSync.for_project(Path("."), Path("params.yaml"))
        >>> outcome = sync.run("split@demo", lambda: run_split(...), summary_path)
    """

    root: Path
    enabled: bool = True
    reason: str = ""
    _lock_file: FileLock | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_project(cls, root: Path, params_path: Path) -> DvcSync:
        """Sync with the DVC project at ``root``, or a disabled one (with the reason) when it cannot agree.

        The stages record params from ``root/params.yaml``: a run with another params file would
        write a lock that lies about the params used, so sync is disabled for it (and logged).
        """
        root = Path(root).resolve()
        if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
            return cls(root, enabled=False, reason=f"{root} is not a DVC project (no dvc.yaml or .dvc/)")
        if Path(params_path).resolve() != root / "params.yaml":
            return cls(root, enabled=False,
                       reason=f"{params_path} is not {root / 'params.yaml'}, which dvc.yaml's stages read")
        return cls(root)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if self.enabled:
            (self.root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
            self._lock_file = FileLock(str(self.root / ".dvc" / "tmp" / LOCK_NAME))
        elif self.reason:
            log.warning("DVC sync off: %s; dvc.lock will not record this run", self.reason)

    def address(self, target: str) -> str:
        """``target`` as DVC resolves it from any working directory: ``/abs/root/dvc.yaml:target``."""
        return f"{self.root / 'dvc.yaml'}:{target}"

    @contextmanager
    def _repo(self) -> Iterator[Any]:
        """A fresh `dvc.repo.Repo` (it caches the index: a new one sees the latest params and files)."""
        from dvc.repo import Repo

        assert self._lock_file is not None
        with _THREAD_LOCK, self._lock_file, Repo(str(self.root)) as repo:
            yield repo

    def changes(self, target: str) -> dict[str, Any]:
        """What ``dvc status <target>`` reports (empty when up to date); errors name the target."""
        from dvc.exceptions import DvcException

        with self._repo() as repo:
            try:
                return repo.status(targets=[self.address(target)])
            except DvcException as exc:
                if type(exc).__name__ in ("StageNotFound", "NoOutputOrStageError"):
                    raise DvcSyncError(f"dvc.yaml has no stage {target!r} (is the catalog in params.yaml?)") \
                        from exc
                raise

    def is_up_to_date(self, target: str) -> bool:
        """True when DVC would not rerun ``target`` (its deps, params, outs and cmd match dvc.lock)."""
        return self.enabled and not self.changes(target)

    def commit(self, target: str) -> None:
        """Record ``target``'s current deps, params and outs in dvc.lock (``dvc commit -f``), then check it."""
        if not self.enabled:
            return
        with _THREAD_LOCK, self._lock_file:
            _commit(self.root, target)
        left = self.changes(target)
        if left:
            raise DvcSyncError(f"{target}: still changed after `dvc commit -f`: {left}")

    def run(self, target: str, stage: Callable[[], StageSummary], summary_path: Path,
            force: bool = False) -> StageOutcome:
        """Call ``stage`` unless DVC says ``target`` is up to date (``force`` calls it anyway), then commit."""
        started = time.perf_counter()
        if not force and self.is_up_to_date(target):
            log.info("%s: up to date in dvc.lock; not rerun", target)
            return StageOutcome(target, last_summary(target, summary_path), skipped=True,
                                seconds=time.perf_counter() - started)
        summary = stage()
        self.commit(target)
        return StageOutcome(target, summary, skipped=False, seconds=time.perf_counter() - started)


def _commit(root: Path, target: str) -> None:
    """``dvc commit -f <target>`` in the project, through DVC's command line (its stable interface)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", target], cwd=root,
                         capture_output=True, text=True)
    if res.returncode:
        raise DvcSyncError(f"{target}: `dvc commit -f` failed (exit {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-2000:]}")


def last_summary(target: str, path: Path) -> StageSummary:
    """The summary a stage wrote last time (``summaries/<stage>.json``), or an empty one."""
    stage, _, catalog = target.partition("@")
    try:
        raw = json.loads(Path(path).read_text())
        summary = StageSummary(raw["stage"], raw["catalog"], raw.get("counts", {}), raw.get("seconds", 0.0),
                               list(raw.get("notes", [])))
    except (OSError, ValueError, KeyError, TypeError):
        summary = StageSummary(stage, catalog or stage)
    summary.notes = ["up to date in dvc.lock: not rerun", *summary.notes]
    return summary
