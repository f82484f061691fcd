"""The machine a benchmark ran on, for its JSON line: results taken on different CPUs are not comparable.

bfloat16 matmuls decide much of our speed on a CPU (the CE's matmuls, the exact ranker): with AMX tiles they
run several times float32's speed, with AVX512-BF16 alone about twice, elsewhere not natively.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from cammsr.core.device import cpu_bf16_units


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform.processor` says, else "unknown"."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    """CPU model, logical cores, bfloat16 matmul units, torch version and whether CUDA is visible."""
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "bf16_units": cpu_bf16_units(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
