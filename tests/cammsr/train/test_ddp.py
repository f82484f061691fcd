"""DDP through torchrun (gloo on CPU, 2 processes) matches one process on the same global batches."""

import socket
import subprocess
import sys

import pytest
import torch
import yaml

from cammsr.core.config import EvaluateParams, ProjectParams, SplitParams, TrainParams
from cammsr.data.splits import run_split
from cammsr.train.trainer import run_train

TRAIN = dict(model="sasrec", hidden_size=16, num_layers=1, num_heads=1, ffn_size=32, dropout=0.0, lr=5e-3,
             batch_size=32, epochs=2, patience=10, num_threads=1, precision="float32",
             ce_precision="float32")  # exact comparison: no bfloat16 anywhere (each rank's CE blocks differ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun with two processes
def test_ddp_two_processes_match_one(tiny_catalog, tmp_path):
    import shutil

    run_split("tiny", SplitParams(), tiny_catalog)
    single = type(tiny_catalog)(tmp_path / "single" / "tiny")
    shutil.copytree(tiny_catalog.root, single.root)
    run_train("tiny", TrainParams(**TRAIN), SplitParams(), EvaluateParams(), ProjectParams(seed=1, device="cpu"),
              single)

    params = {"project": {"seed": 1, "device": "cpu", "data_dir": str(tiny_catalog.root.parent)},
              "catalogs": {"tiny": {"reviews": "file:unused"}}, "train": TRAIN}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "cammsr.cli", "train", "--catalog", "tiny", "--params", str(tmp_path / "p.yaml")]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    a = torch.load(single.models_dir / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tiny_catalog.models_dir / "last.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    summary = yaml.safe_load((tiny_catalog.root / "summaries" / "train.json").read_text())
    assert summary["counts"]["world_size"] == 2
