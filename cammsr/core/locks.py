"""Locks on a stage's outputs: two runs that would write the same files never overlap.

Two ``cammsr ingest --catalog toys`` at once would share ``raw/*.part`` and the temp folder; two
``train`` runs would overwrite each other's checkpoints. Each stage of each catalog has one lock file,
``data/.locks/<stage>@<catalog>.lock`` (`lock_path`), taken around everything the stage writes:

    with output_lock(lock_path(data_root, "ingest@toys"), "ingest of catalog toys", wait=True):
        ...  # write the outputs

The second run waits, saying who holds the lock, or with ``wait=False`` stops at once with `LockBusy`
(the CLI's ``--no-wait``). The lock is an OS file lock (`filelock`): a run that is killed, even with
SIGKILL, releases it, so a lock can never be left stale. The stage runner (`cammsr.ops.stages`) takes it
for every registered stage; code that writes a stage's outputs outside the runner takes the same lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from cammsr.core.errors import LockBusy

log = logging.getLogger(__name__)

LOCK_DIR = ".locks"


def lock_path(data_root: str | Path, key: str) -> Path:
    """The lock file of ``key`` (``<stage>@<catalog>``, names already validated) under ``data_root``."""
    return Path(data_root) / LOCK_DIR / f"{key}.lock"


def _holder_file(lock_file: Path) -> Path:
    return lock_file.with_name(lock_file.name + ".holder")


def holder(lock_file: str | Path) -> str:
    """Who holds ``lock_file``, as its holder wrote it (pid, host, since when); '' when unknown."""
    with contextlib.suppress(OSError):
        return _holder_file(Path(lock_file)).read_text().strip()
    return ""


@contextlib.contextmanager
def output_lock(lock_file: str | Path, what: str, *, wait: bool = True, poll_s: float = 0.2) -> Iterator[None]:
    """Hold ``lock_file`` for the duration of the block.

    Args:
        lock_file: the lock (`lock_path`); its folder is created.
        what: the outputs it guards, for messages ("ingest of catalog toys").
        wait: when another run holds it, wait for that run (True) or raise `LockBusy` at once (False).
        poll_s: how often a waiting run tries again.

    Raises:
        LockBusy: ``wait`` is False and another run holds the lock.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder(lock_file) or "another process"
        if not wait:
            raise LockBusy(f"{what}: another run is writing these outputs ({who}); nothing was done "
                           f"(run again when it has finished, or without --no-wait to wait for it)") from None
        log.warning("%s: another run is writing these outputs (%s); waiting for it to finish "
                    "(--no-wait stops instead)", what, who)
        started = time.monotonic()
        lock.acquire(poll_interval=poll_s)
        log.info("%s: the other run finished after %.1f s; going on", what, time.monotonic() - started)
    try:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with contextlib.suppress(OSError):
            _holder_file(lock_file).write_text(f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            _holder_file(lock_file).unlink()
        lock.release()
