"""Smoke tests of the benchmark scripts' own logic (fast; RecBole not needed)."""

import gzip
import json

import yaml

from benchmarks.ingest import ingest_once, write_catalog
from benchmarks.vs_recbole import TOYS, epoch_stats, scratch_params
from cammsr.config import load_params


def test_ingest_benchmark_catalog_is_amazon_2018_and_ingests(tmp_path):
    reviews, meta = write_catalog(tmp_path / "x1", scale=1, base_users=20)
    with gzip.open(reviews, "rt") as fh:
        lines = [json.loads(line) for line in fh]
    assert {"reviewerID", "asin", "unixReviewTime", "vote", "verified"} <= set(lines[0])
    r = ingest_once(tmp_path / "x1")
    assert r["interactions"] == len(lines) and r["lines"] == len(lines) + 10  # 20 users x (5 + Poisson), 10 items
    assert r["raw_mb"] > r["gz_mb"] > 0 and r["peak_rss_mb"] >= r["rss_after_imports_mb"]


def test_scratch_params_adds_toys_under_data_bench(tmp_path):
    path = scratch_params(tmp_path / "params.yaml", "toys")
    p = load_params(path)
    assert p.project.data_dir == "data/bench" and list(p.catalogs) == ["toys"]
    assert p.catalogs["toys"].images is False and yaml.safe_load(path.read_text())["catalogs"]["toys"] == TOYS


def test_epoch_stats_give_medians_and_best():
    run = {"train_epochs": [{"wall_s": 10, "cpu_s": 18}, {"wall_s": 30, "cpu_s": 50}, {"wall_s": 20, "cpu_s": 36}],
           "valid_passes": [{"wall_s": 2}, {"wall_s": 4}], "valid_users": 300}
    s = epoch_stats(run, targets=1000)
    assert s["epoch_s"] == 20 and s["epoch_cpu_s"] == 36 and s["epoch_best_s"] == 10 and s["epoch_cpu_best_s"] == 18
    assert s["targets_per_s"] == 100  # from the best epoch
    assert s["eval_s"] == 3 and s["eval_best_s"] == 2 and s["eval_users_per_s"] == 150
