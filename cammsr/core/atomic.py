"""Atomic file writes: write to a temp file, fsync, then rename over the target.

A reader (or a run killed halfway) sees either the old file or the new one, never a torn one.

Where the temp files live: inside a stage run (`stage_temp_dir`, which the stage runner opens for
every stage) they go to that stage's own temp folder, ``data/NAME/.tmp/<stage>/``, which the next run
of the stage clears first, so a killed run leaves nothing that outlives the next one. Outside a stage
they go beside the target. Either way the final file gets the permissions a plain ``open()`` would
give it (the target's own mode when it exists, else 0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_STAGE_TMP: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cammsr_stage_tmp", default=None)


@contextlib.contextmanager
def stage_temp_dir(folder: str | Path) -> Iterator[Path]:
    """Make ``folder`` (emptied first) the home of every temp file written in this context; remove it after.

    Re-entrant: inside a context that already uses ``folder`` it does nothing (the stage runner opens it,
    and so does a stage function that may also be called directly). Worker threads do not inherit the
    context: submit with ``contextvars.copy_context().run``.
    """
    folder = Path(folder)
    current = _STAGE_TMP.get()
    if current is not None and current.absolute() == folder.absolute():
        yield folder
        return
    shutil.rmtree(folder, ignore_errors=True)  # what a killed run of this stage left
    folder.mkdir(parents=True, exist_ok=True)
    token = _STAGE_TMP.set(folder)
    try:
        yield folder
    finally:
        _STAGE_TMP.reset(token)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # the shared `.tmp/` too, once no other stage's folder is in it


def _temp_dir_for(target: Path) -> Path:
    """The stage's temp folder when there is one on the target's file system (rename works), else beside it."""
    folder = _STAGE_TMP.get()
    if folder is not None and folder.is_dir():
        with contextlib.suppress(OSError):
            if os.stat(folder).st_dev == os.stat(target.parent).st_dev:
                return folder
    return target.parent


def new_temp_file(target: str | Path, suffix: str = ".tmp") -> Path:
    """Create an empty temp file for ``target`` (see the module doc for where) and return its path.

    Its mode is the target's when that exists (and is writable), else 0666 minus the umask: what the
    renamed file keeps.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = _temp_dir_for(target)
    mode = 0o666  # open() applies the umask
    with contextlib.suppress(OSError):
        existing = os.stat(target).st_mode & 0o7777
        if existing & 0o200:  # not a read-only DVC cache link: the user's own mode for the file
            mode = existing
    while True:
        path = folder / f".{target.name}.{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        os.close(fd)
        if mode != 0o666:
            os.chmod(path, mode)
        return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; some file systems refuse to open a directory, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path for ``target``; on success rename it over ``target``, else delete it."""
    target = Path(target)
    tmp_path = new_temp_file(target, suffix)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | Path, obj: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(target: str | Path, table: pa.Table) -> None:
    """Write ``table`` (a pyarrow Table) as one Parquet file, atomically."""
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")
