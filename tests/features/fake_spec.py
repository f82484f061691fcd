"""A model-free encoder spec for the Dask tests: light to import in worker processes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from features.store import EncodedChunk


def fake_vector(text: str, dim: int = 4) -> np.ndarray:
    """A deterministic float32 [dim] vector derived from the text."""
    raw = np.frombuffer(hashlib.sha256(text.encode()).digest()[: 4 * dim], np.uint32)
    return raw.astype(np.float32) / 2**32


class Boom(RuntimeError):
    """Raised by `FakeSpec` on a chosen input, standing in for a worker dying mid-shard."""


@dataclass(frozen=True)
class FakeSpec:
    """Embeds text by hashing it; ``"bad:..."`` inputs fail, ``crash_on`` raises `Boom`."""

    crash_on: str | None = None

    def build(self) -> int:
        return os.getpid()  # the "model": lets a test see which process built it

    def encode(
        self, encoder: int, inputs: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> EncodedChunk:
        if self.crash_on in inputs:
            raise Boom(f"crashed on {self.crash_on!r} in process {encoder}")
        ok = [i for i, text in enumerate(inputs) if not text.startswith("bad:")]
        emb = np.stack([fake_vector(inputs[i]) for i in ok]) if ok else np.zeros((0, 4), np.float32)
        return EncodedChunk(ok, emb, {i: "bad input" for i, text in enumerate(inputs) if text.startswith("bad:")})
