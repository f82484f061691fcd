"""cammsr/core/device.py: the precision choices."""

from __future__ import annotations

import pytest
import torch

from cammsr.core import device as device_module
from cammsr.core.device import resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_explicit_choices_ignore_the_hardware(monkeypatch):
    monkeypatch.setattr(device_module, "bf16_matmul_supported", lambda device: False)
    assert resolve_precision("bfloat16", CPU) == torch.bfloat16  # asked for: given, even emulated
    assert resolve_precision("float32", CPU) == torch.float32
    monkeypatch.setattr(device_module, "bf16_matmul_supported", lambda device: True)
    assert resolve_precision("float32", CPU) == torch.float32


@pytest.mark.parametrize("supported", [False, True])
def test_auto_follows_the_hardware_and_the_allowed_devices(monkeypatch, supported):
    monkeypatch.setattr(device_module, "bf16_matmul_supported", lambda device: supported)
    expected = torch.bfloat16 if supported else torch.float32
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("auto", CUDA) == expected
    assert resolve_precision("auto", CPU, auto_on=("cpu",)) == expected
    assert resolve_precision("auto", CUDA, auto_on=("cpu",)) == torch.float32  # evaluation: bf16 on CPU only


def test_auto_on_this_machine_matches_its_cpu():
    has = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if has else torch.float32)



@pytest.mark.parametrize(("amx", "avx", "expected"), [(True, True, "amx"), (True, False, "amx"),
                                                      (False, True, "avx512_bf16"), (False, False, "none")])
def test_cpu_bf16_units_name_the_best_unit_and_decide_native_support(amx, avx, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx, raising=False)
    assert device_module.cpu_bf16_units() == expected
    assert device_module.bf16_matmul_supported(CPU) == (expected != "none")


def test_cpu_bf16_units_without_the_probes_is_none(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert device_module.cpu_bf16_units() == "none"

@pytest.mark.parametrize("bad", ["fp16", "float16", "BF16", ""])
def test_unknown_choice_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match=f"precision '{bad}'"):
        resolve_precision(bad, CPU)
