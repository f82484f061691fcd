"""What kind of failure an exception is, and the one line a user reads about it.

Two markers sort the errors the code raises on purpose:

- `BadInput` (exit code 2): what the user gave is wrong: a file, a URL, a params value, a catalog name.
  Running again changes nothing until the input changes.
- `Fault` (exit code 1): the input may be fine but the run could not finish: a server that stayed
  down, a full disk, a lock held by another run.

Error classes mix one of them in (``class SourceError(BadInput, ValueError)``), so the kind is declared
where the error is. `describe` turns any exception, marked or not, into ``(exit code, one line)``:
OS errors name the file and what to do, anything else unexpected says how to see the traceback.
"""

from __future__ import annotations

import errno
import zlib

OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
STORAGE_ERRNOS = OUT_OF_SPACE | NO_PERMISSION  # the environment, not the item: they stop a stage


class BadInput(Exception):
    """Marker base: the input (a file, URL, param, name) is wrong; the message names it. Exit code 2."""

    exit_code = 2


class Fault(Exception):
    """Marker base: the run could not finish for a reason outside the input. Exit code 1."""

    exit_code = 1


class StorageError(Fault, OSError):
    """Writing an output failed for want of space or permission; the stage stopped, earlier outputs stand."""


class LockBusy(Fault):
    """Another run holds the lock on the outputs this run would write (``--no-wait``)."""


def is_storage_error(exc: BaseException) -> bool:
    """True for out-of-space and permission errors: they say nothing about the item being written."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def storage_error(exc: OSError, path: object = None) -> StorageError:
    """A `StorageError` naming ``path`` (or the file the OS named) and what to do."""
    where = path if path is not None else (exc.filename or "an output file")
    if exc.errno in OUT_OF_SPACE:
        what = "no space left on the device (or over a quota or file-size limit)"
        todo = "free some space and run the stage again"
    else:
        what = "permission denied"
        todo = "check who owns the data folder and its mode, then run the stage again"
    err = StorageError(exc.errno, f"{where}: {what} ({exc.strerror or exc}); the stage stopped and its "
                                  f"previous outputs are intact; {todo}")
    return err


def describe(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one line)`` for a failure shown to a user (the CLI's last line)."""
    if isinstance(exc, StorageError):
        return exc.exit_code, exc.strerror or str(exc)
    code = getattr(exc, "exit_code", None)  # BadInput, Fault, and errors that say so themselves (downloads)
    if isinstance(code, int) and not isinstance(exc, OSError):
        return code, _one_line(str(exc))
    if isinstance(exc, OSError):
        if exc.errno in STORAGE_ERRNOS:
            return 1, storage_error(exc).strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        return 1, f"{where}{exc.strerror or exc}"
    if isinstance(exc, EOFError | zlib.error):
        return 2, f"a compressed file ends early or is corrupt ({exc})"
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return 2, exc.args[0]  # unknown catalog or stage: the message lists the known ones
    name = type(exc).__name__
    return 1, f"unexpected {name}: {_one_line(str(exc)) or '(no message)'} (run with --verbose for the traceback)"


def _one_line(text: str) -> str:
    """Multi-line messages (pydantic's lists) keep their lines joined by '; ' so the error stays one line."""
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts)
