"""Frozen image encoder (CLIP via open_clip): item image -> one vector per item.

Images are read, checked against the sha256 that ingest recorded, and decoded in a torch
DataLoader (``num_workers`` from params) under a pixel limit against decompression bombs.
An image that cannot be read, does not match its hash, is too large or does not decode is a
recorded failure, never a crash: it gets no row, so the reader's mask says "absent".

Embeddings are ``model.encode_image(x)`` as is, NOT L2-normalised: the recommender puts a
learned Linear on top, which is free to use the norm, and anyone who wants cosine
similarity can normalise at read time (the reverse is not possible).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import multiprocessing
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cammsr.core.config import ImageFeatureParams
from cammsr.core.device import autocast, pick_device, torch_threads
from features.store import EncodedChunk
from features.text import ModelLoadError

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0  # random-weight models are seeded so reruns (and upserts) stay comparable


@dataclass(frozen=True)
class ImageJob:
    """One image to encode: its position in the wanted list, file and expected sha256."""

    pos: int
    path: Path
    sha256: str


@dataclass
class Decoded:
    """A decoded image (pixels [3, H, W]) or the reason it could not be."""

    pos: int
    pixels: torch.Tensor | None = None
    error: str | None = None


def decode_image(job: ImageJob, transform: Callable, max_pixels: int, min_side: int | None = None) -> Decoded:
    """Read, verify and preprocess one image; failures come back as ``Decoded.error``.

    With ``min_side`` (the model's input side), a JPEG at least twice that size is decoded at
    1/2, 1/4 or 1/8 scale by libjpeg (`PIL.Image.Image.draft`), never below ``min_side`` on its
    short side, before ``transform`` resizes it: the same picture for a fraction of the decoding
    and resizing work (the main cost outside the model on a CPU). Reasons read
    ``"<kind>: <file>: <detail>"`` so the summary can count them by kind.
    """
    try:
        data = job.path.read_bytes()
    except FileNotFoundError:
        return Decoded(job.pos, error=f"file not found: {job.path}")
    except OSError as exc:
        return Decoded(job.pos, error=f"cannot read: {job.path}: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != job.sha256:
        detail = f"images.parquet has {job.sha256[:12]}, the file {digest[:12]}"
        return Decoded(job.pos, error=f"sha256 mismatch: {job.path}: {detail}")
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x MAX_IMAGE_PIXELS; the exact check below replaces the warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
                if width * height > max_pixels:
                    detail = f"{width}x{height} > max_image_pixels={max_pixels}"
                    return Decoded(job.pos, error=f"too many pixels: {job.path}: {detail}")
                if min_side and im.format == "JPEG" and 2 * min_side <= min(width, height):
                    scale = min_side / min(width, height)
                    im.draft(im.mode, (math.ceil(width * scale), math.ceil(height * scale)))
                rgb = im.convert("RGB")  # decodes
        return Decoded(job.pos, pixels=transform(rgb))
    except Image.DecompressionBombError as exc:
        return Decoded(job.pos, error=f"too many pixels: {job.path}: {exc}")
    except Exception as exc:  # PIL raises many types for broken files; each is a recorded failure
        return Decoded(job.pos, error=f"cannot decode: {job.path}: {type(exc).__name__}: {exc}")


class ImageFiles(Dataset):
    """Map-style dataset over `ImageJob`s; items are `Decoded`."""

    def __init__(self, jobs: Sequence[ImageJob], transform: Callable, max_pixels: int, min_side: int | None = None):
        self.jobs, self.transform, self.max_pixels, self.min_side = list(jobs), transform, max_pixels, min_side

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> Decoded:
        return decode_image(self.jobs[i], self.transform, self.max_pixels, self.min_side)


def collate(batch: list[Decoded]) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """-> (positions of decoded images, pixels [B, 3, H, W] or None, {position: error})."""
    ok = [d for d in batch if d.error is None]
    pixels = torch.stack([d.pixels for d in ok]) if ok else None
    return [d.pos for d in ok], pixels, {d.pos: d.error for d in batch if d.error is not None}


def _set_pixel_limit(max_pixels: int, _worker_id: int | None = None) -> None:
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own decompression-bomb guard, per worker process


def _worker_context() -> multiprocessing.context.BaseContext | None:
    """Where the start method is ``spawn`` (Dask workers, macOS), fork DataLoader workers from a
    forkserver that has imported this module once, instead of paying torch's import per chunk."""
    if multiprocessing.get_start_method() != "spawn" or "forkserver" not in multiprocessing.get_all_start_methods():
        return None  # fork (the Linux default) is already cheap
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # takes effect when the server starts (once per process)
    return context


class ImageEncoder:
    """open_clip model + its eval preprocess; ``encode(jobs)`` -> embeddings and failures."""

    def __init__(self, params: ImageFeatureParams, device: torch.device, max_pixels: int):
        import open_clip  # heavy import, only when encoding

        self.params, self.device, self.max_pixels = params, device, max_pixels
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    params.model, pretrained=params.pretrained, device="cpu"
                )
        except Exception as exc:  # unknown architecture, tag not downloadable offline, ...
            raise ModelLoadError(
                f"could not load image model {params.model!r} (pretrained={params.pretrained!r}): "
                f"{type(exc).__name__}: {exc}. Known architectures: open_clip.list_models(); "
                "pretrained tags need the weights downloaded first when offline"
            ) from exc
        if params.pretrained is None:
            log.warning(
                "image features for %s come from a RANDOM-weight model (features.image.pretrained "
                "is null, seed %d): fine for the offline demo, meaningless for real catalogs",
                params.model,
                RANDOM_INIT_SEED,
            )
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        size = model.visual.image_size
        size = size if isinstance(size, tuple | list) else (size, size)
        self.min_side = max(size)  # JPEGs are decoded at reduced scale down to this (decode_image)
        with torch.inference_mode():
            self.dim = int(self.model.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])
        log.info("image model %s (pretrained=%s) on %s, d=%d", params.model, params.pretrained, device, self.dim)

    def batches(self, jobs: Sequence[ImageJob]) -> Iterator[tuple[list[int], torch.Tensor | None, dict[int, str]]]:
        """Decoded batches of ``jobs`` in order: (positions, pixels [B, 3, H, W] or None, failures).

        ``num_workers > 0``: a DataLoader with that many worker processes (for GPU hosts, where
        decoding must keep up with the model). ``0``: decoded here between forwards, by a pool of
        as many threads as torch has (PIL and the transform's tensor ops release the GIL), each
        on one torch thread, since the transform's small tensor ops are several times slower
        spread over intra-op threads. On a CPU host this beats worker processes, which compete
        with the forward for the same cores.
        """
        files = ImageFiles(jobs, self.preprocess, self.max_pixels, self.min_side)
        if self.params.num_workers:
            yield from DataLoader(
                files,
                batch_size=self.params.batch_size,
                num_workers=self.params.num_workers,
                collate_fn=collate,
                worker_init_fn=functools.partial(_set_pixel_limit, self.max_pixels),
                pin_memory=self.device.type == "cuda",
                multiprocessing_context=_worker_context(),
            )
            return
        bs = self.params.batch_size
        with ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="decode") as pool:
            for begin in range(0, len(files), bs):
                with torch_threads(1):
                    decoded = list(pool.map(files.__getitem__, range(begin, min(begin + bs, len(files)))))
                yield collate(decoded)

    def encode(
        self, jobs: Sequence[ImageJob], progress: Callable[[int], None] | None = None
    ) -> tuple[list[int], np.ndarray, dict[int, str]]:
        """-> (positions encoded, float32 [len(positions), d], {position: failure reason})."""
        positions: list[int] = []
        chunks: list[np.ndarray] = []
        failures: dict[int, str] = {}
        previous_limit = Image.MAX_IMAGE_PIXELS
        _set_pixel_limit(self.max_pixels)  # decoding happens in this process when num_workers == 0
        try:
            with torch.inference_mode(), autocast(self.device, self.params.dtype):
                for pos, pixels, failed in self.batches(jobs):
                    failures.update(failed)
                    if pixels is not None:
                        x = pixels.to(self.device, non_blocking=True)  # (B, 3, H, W)
                        chunks.append(self.model.encode_image(x).float().cpu().numpy())  # (B, d)
                        positions.extend(pos)
                    if progress is not None:
                        progress(len(pos) + len(failed))
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
        emb = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
        return positions, emb, failures


@dataclass(frozen=True)
class ImageSpec:
    """How to build and run the image encoder; picklable, so each Dask worker builds its own.

    ``device`` is the preference (``auto``, ``cpu``, ``cuda``), resolved where the model loads.
    """

    params: ImageFeatureParams
    device: str = "auto"
    max_pixels: int = 40_000_000

    def build(self) -> ImageEncoder:
        return ImageEncoder(self.params, pick_device(self.device), self.max_pixels)

    def encode(
        self,
        encoder: ImageEncoder,
        images: Sequence[tuple[Path, str]],
        progress: Callable[[int], None] | None = None,
    ) -> EncodedChunk:
        """``images``: (file, expected sha256) pairs -> rows and failures, by index into ``images``."""
        jobs = [ImageJob(i, path, sha) for i, (path, sha) in enumerate(images)]
        return EncodedChunk(*encoder.encode(jobs, progress))
