"""Which torch device the encoders run on (``project.device`` in params.yaml)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_announced: set[str] = set()


def pick_device(pref: str) -> torch.device:
    """Resolve ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` to a torch device.

    ``auto`` picks CUDA when torch sees a GPU, else the CPU. Asking for CUDA on a machine
    without one is an error rather than a silent CPU run.
    """
    pref = pref.strip().lower()
    if pref == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif pref == "cpu":
        device = torch.device("cpu")
    elif pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {pref!r} requested (project.device) but torch {torch.__version__} sees no CUDA "
                "device; use 'auto' or 'cpu'"
            )
        device = torch.device(pref)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {pref!r} requested but only {torch.cuda.device_count()} GPU(s) visible"
            )
    else:
        raise ValueError(f"device {pref!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if str(device) not in _announced:  # once per process, not once per caller
        _announced.add(str(device))
        log.info("encoding on %s", device)
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA for ``float16``/``bfloat16``; a no-op on the CPU (always float32)."""
    if device.type != "cuda" or dtype not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=_DTYPES[dtype])


def cpu_bf16_units() -> str:
    """What runs bfloat16 matmuls on this CPU, as torch sees it: "amx" (tiles, several times float32's speed),
    "avx512_bf16" (dot products, about twice) or "none" (torch emulates them, slower than float32)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return "none"


def bf16_matmul_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively: CUDA that supports bfloat16, or a CPU with
    AMX tiles or AVX512-BF16 (`cpu_bf16_units`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_units() != "none"
    return False


def resolve_precision(pref: str, device: torch.device, auto_on: tuple[str, ...] = ("cpu", "cuda")) -> torch.dtype:
    """``auto`` / ``float32`` / ``bfloat16`` (``train.precision``, ``evaluate.precision``) -> the dtype to use.

    ``auto`` is bfloat16 on a device of a type in ``auto_on`` where `bf16_matmul_supported`, else float32.
    """
    if pref == "float32":
        return torch.float32
    if pref == "bfloat16":
        return torch.bfloat16
    if pref == "auto":
        on = device.type in auto_on and bf16_matmul_supported(device)
        return torch.bfloat16 if on else torch.float32
    raise ValueError(f"precision {pref!r}: expected 'auto', 'float32' or 'bfloat16'")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave the setting alone)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
