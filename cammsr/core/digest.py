"""Content digests of files."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK_BYTES), b""):
            hasher.update(block)
    return hasher.hexdigest()
