"""Smoke tests of the benchmark scripts' own logic (fast; RecBole not needed)."""

import gzip
import json

import torch
import yaml

from benchmarks.ingest import ingest_once, write_catalog
from benchmarks.vs_recbole import TOYS, epoch_stats, scratch_params
from cammsr.core.config import load_params
from tests.params_builder import params_dict, write_params


def test_ingest_benchmark_catalog_is_amazon_2018_and_ingests(tmp_path):
    reviews, meta = write_catalog(tmp_path / "x1", scale=1, base_users=20)
    with gzip.open(reviews, "rt") as fh:
        lines = [json.loads(line) for line in fh]
    assert {"reviewerID", "asin", "unixReviewTime", "vote", "verified"} <= set(lines[0])
    r = ingest_once(tmp_path / "x1")
    assert r["interactions"] == len(lines) and r["lines"] == len(lines) + 10  # 20 users x (5 + Poisson), 10 items
    assert r["raw_mb"] > r["gz_mb"] > 0 and r["peak_rss_mb"] >= r["rss_after_imports_mb"]


def test_scratch_params_take_the_repo_settings_but_only_toys_under_data_bench(tmp_path, monkeypatch):
    import benchmarks.vs_recbole as vs_recbole

    repo = tmp_path / "repo"  # a working params.yaml with a tuned setting and a catalog of its own
    write_params(repo / "params.yaml", params_dict({"web": {"reviews": "https://127.0.0.1:9/r.json"}},
                                                   {"train": {"epochs": 7}}))
    monkeypatch.setattr(vs_recbole, "REPO", repo)
    path = scratch_params(tmp_path / "bench" / "params.yaml", "toys")
    p = load_params(path)
    assert p.project.data_dir == "data/bench" and list(p.catalogs) == ["toys"] and p.train.epochs == 7
    assert p.catalogs["toys"].images is False and yaml.safe_load(path.read_text())["catalogs"]["toys"] == TOYS


def test_epoch_stats_give_medians_and_best():
    run = {"train_epochs": [{"wall_s": 10, "cpu_s": 18}, {"wall_s": 30, "cpu_s": 50}, {"wall_s": 20, "cpu_s": 36}],
           "valid_passes": [{"wall_s": 2}, {"wall_s": 4}], "valid_users": 300}
    s = epoch_stats(run, targets=1000)
    assert s["epoch_s"] == 20 and s["epoch_cpu_s"] == 36 and s["epoch_best_s"] == 10 and s["epoch_cpu_best_s"] == 18
    assert s["targets_per_s"] == 100  # from the best epoch
    assert s["eval_s"] == 3 and s["eval_best_s"] == 2 and s["eval_users_per_s"] == 150


def test_eval_breakdown_times_each_fix_and_checks_old_and_new_ranks_agree(tmp_path, monkeypatch):
    import sys

    import torch

    from benchmarks import eval_breakdown
    from cammsr.core.config import EvaluateParams, ProjectParams, SplitParams, TrainParams
    from cammsr.data.splits import run_split
    from cammsr.train.trainer import run_train
    from tests.cammsr.conftest import write_tiny_catalog

    paths = write_tiny_catalog(tmp_path)
    run_split("tiny", SplitParams(), paths)
    run_train("tiny", TrainParams(model="sasrec", epochs=1, hidden_size=16, num_layers=2, num_heads=1, ffn_size=32,
                                  batch_size=32), SplitParams(), EvaluateParams(), ProjectParams(device="cpu"), paths)
    write_params(tmp_path / "params.yaml", params_dict({"tiny": {"reviews": "file:unused.json.gz", "images": False}},
                                                       {"project": {"data_dir": str(tmp_path / "data")}}))
    monkeypatch.setattr(sys, "argv", ["eval_breakdown", "--catalog", "tiny", "--params", str(tmp_path / "params.yaml"),
                                      "--batch-size", "50", "--repeats", "1", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        # No capsys here: the first import of dvc (through dvclive) binds its log handler to the
        # current stdout, and a capsys stream is closed after the test (later tests then fail to log).
        result = eval_breakdown.main()  # asserts inside: identical rank counts, last-position encoder == full pass
    finally:
        torch.set_num_threads(threads)
    assert result["users"] == 120 and result["items"] == 40 and result["batch_size"] == 50
    assert result["rank_targets_s"] > 0 and result["encoder_speedup"] > 0


def test_synthetic_feature_twin_shares_the_split_and_gives_cammsr_three_modalities(tmp_path):
    from benchmarks.vs_recbole import SYNTHETIC_DIMS, synthetic_feature_catalog
    from cammsr.core.config import SplitParams, TrainParams
    from cammsr.core.paths import CatalogPaths
    from cammsr.data.splits import load_splits, run_split
    from cammsr.model.io import build_model
    from tests.cammsr.conftest import write_tiny_catalog

    paths = write_tiny_catalog(tmp_path)
    run_split("tiny", SplitParams(), paths)
    name = synthetic_feature_catalog("tiny", paths)
    twin = CatalogPaths.of(name, paths.root.parent)
    split = load_splits(twin.splits_dir)
    assert split.item_ids == load_splits(paths.splits_dir).item_ids
    model = build_model(TrainParams(model="cammsr", hidden_size=16, num_heads=1), SplitParams(), split, twin, seed=0)
    assert model.mods == ("id", "text", "image")
    assert {m: model.frozen[m].features.shape[1] for m in ("text", "image")} == SYNTHETIC_DIMS
    assert all(bool(model.frozen[m].present[1:].all()) for m in ("text", "image"))


def test_the_synthetic_twin_reads_its_base_catalogs_scratch_params():
    from benchmarks.vs_recbole import BENCH, scratch_params_path

    assert scratch_params_path("toys") == BENCH / "params-toys.yaml"
    assert scratch_params_path("toys-synthetic-features") == BENCH / "params-toys.yaml"
    assert scratch_params_path("features-of-toys") == BENCH / "params-features-of-toys.yaml"


def test_machine_names_the_cpu_its_cores_and_bf16_units(tmp_path):
    from benchmarks import machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu\n")
    assert machine.cpu_model(info) == "AMD EPYC 9B14"
    assert machine.cpu_model(tmp_path / "absent") != ""  # falls back to platform.processor() or "unknown"
    d = machine.describe()
    assert set(d) == {"cpu", "logical_cores", "bf16_units", "torch", "cuda"}
    assert d["bf16_units"] in {"amx", "avx512_bf16", "none"} and d["logical_cores"] >= 1


class _OneLinear(torch.nn.Module):
    """A training loss with one matmul forward and one backward (the weight's; the input needs no gradient)."""

    def __init__(self, length: int, out: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(length, out)

    def forward(self, seq, targets, normalizer):
        return self.lin(seq.float()).sum(), {}


def test_training_flops_count_forward_and_backward_matmuls_of_every_batch():
    from benchmarks.flops import training_flops

    model = _OneLinear(5, 3)
    batches = [(torch.ones(4, 5, dtype=torch.long), torch.tensor([[1, 2, 0, 0, 0]] * 4)),
               (torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))]
    got = training_flops(model, batches)
    # forward x [B, 5] @ W.T [5, 3]: 2*B*5*3; backward dW = dy.T [3, B] @ x [B, 5]: the same again
    assert got["by_op"] == {"addmm": 2 * 6 * 5 * 3, "mm": 2 * 6 * 5 * 3}
    assert got["flops"] == 4 * 6 * 5 * 3 and got["steps"] == 2 and got["targets"] == 8 + 5
    assert model.lin.weight.grad is None  # gradients left cleared: nothing accumulates into a later step


def test_flops_cli_counts_models_and_switches_on_the_same_batches(tmp_path, monkeypatch, capsys):
    import sys

    from benchmarks import flops
    from benchmarks.vs_recbole import synthetic_feature_catalog
    from cammsr.core.config import SplitParams
    from cammsr.data.splits import run_split
    from tests.cammsr.conftest import write_tiny_catalog

    paths = write_tiny_catalog(tmp_path)
    run_split("tiny", SplitParams(), paths)
    twin = synthetic_feature_catalog("tiny", paths)
    write_params(tmp_path / "params.yaml", params_dict(
        {"tiny": {"reviews": "file:unused.json.gz", "images": False}},
        {"project": {"data_dir": str(tmp_path / "data")},
         "train": {"hidden_size": 16, "num_heads": 1, "ffn_size": 32}}))
    threads = torch.get_num_threads()
    got = {}
    try:
        for name, catalog, model, extra in (("sasrec", "tiny", "sasrec", []), ("cammsr", twin, "cammsr", []),
                                            ("no_cl", twin, "cammsr", ["--set", "swap_cl=false"])):
            out = tmp_path / f"{name}.json"
            monkeypatch.setattr(sys, "argv", ["flops", "--catalog", catalog, "--params", str(tmp_path / "params.yaml"),
                                              "--model", model, "--steps", "3", "--batch-size", "16",
                                              "--batch-targets", "150", "--threads", "1", "--out", str(out), *extra])
            flops.main()
            got[name] = json.loads(out.read_text())
    finally:
        torch.set_num_threads(threads)
    sasrec, cammsr = got["sasrec"], got["cammsr"]
    assert sasrec["modalities"] == ["id"] and cammsr["modalities"] == ["id", "text", "image"]
    assert sasrec["steps"] == cammsr["steps"] == 3 and sasrec["targets"] == cammsr["targets"] > 0
    assert sasrec["flops_per_target"] == sasrec["flops"] / sasrec["targets"]
    assert sasrec["flops"] == sum(sasrec["by_op"].values())
    # three encoder views and a score table three modalities wide, at the same width per modality
    assert 2 < cammsr["flops_per_target"] / sasrec["flops_per_target"] < 6
    # without the swap views: two fewer encoder views, the same CE
    assert got["no_cl"]["set"] == ["swap_cl=false"] and got["no_cl"]["targets"] == cammsr["targets"]
    assert sasrec["flops"] < got["no_cl"]["flops"] < cammsr["flops"]
