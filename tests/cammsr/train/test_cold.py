"""The cold-item study: a split with items held out of training, and the study's report."""

import json

import numpy as np
import pytest

from cammsr.core.config import Params, SplitParams
from cammsr.data.splits import SplitData, run_split
from cammsr.train.cold import make_cold_split, run_cold_items
from tests.cammsr.conftest import write_random_features

IDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]


def _split(seqs: list[list[str]]) -> SplitData:
    idx = {item: k + 1 for k, item in enumerate(IDS)}
    return SplitData(IDS, np.array([-1] + [k % 3 for k in range(len(IDS))]), ["x", "y", "z"],
                     [np.array([idx[i] for i in s], dtype=np.int64) for s in seqs], [f"u{k}" for k in range(len(seqs))])


def test_cold_items_leave_every_sequence_except_as_the_test_target():
    seqs = [list("abcdej"), list("fghij"), list("ab"), list("jjab"), list("abcdefghi")]
    cold = make_cold_split(_split(seqs), 0.3, seed=4)
    gone = set(cold.cold_ids)
    assert len(gone) == 3 and cold.num_warm == 7
    assert cold.full.item_ids == [i for i in IDS if i not in gone] + sorted(gone)
    assert cold.train.item_ids == cold.full.item_ids[:7]
    cat_of = dict(zip(IDS, range(len(IDS)), strict=True))
    assert cold.full.item_category[1:].tolist() == [cat_of[i] % 3 for i in cold.full.item_ids]
    for s, got in zip(seqs, cold.full.sequences, strict=True):  # by hand, in item ids
        history = [i for i in s[:-1] if i not in gone]
        expected = history + [s[-1]] if len(s) >= 3 and len(history) >= 2 else [i for i in s if i not in gone]
        assert [cold.full.item_ids[k - 1] for k in got] == expected
    # training reads only warm items: the training parts and the valid targets
    assert all(k <= 7 for s in cold.train.train_sequences() for k in s)
    assert (cold.train.held_out("valid", 50)[1] <= 7).all()
    _, targets, is_cold = cold.test(50)
    assert is_cold.tolist() == [cold.full.item_ids[t - 1] in gone for t in targets]
    again = make_cold_split(_split(seqs), 0.3, seed=4)
    assert again.cold_ids == cold.cold_ids
    with pytest.raises(ValueError, match="holds out 0"):
        make_cold_split(_split(seqs), 0.01, seed=0)


def test_run_cold_items_reports_cammsr_sasrec_and_popularity(tiny_catalog, tmp_path):
    run_split("tiny", SplitParams(), tiny_catalog)
    write_random_features(tiny_catalog)
    params = Params.model_validate({
        "catalogs": {"tiny": {"reviews": "file:unused"}}, "project": {"device": "cpu"},
        "train": {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "ffn_size": 32, "batch_size": 64},
    })
    out = tmp_path / "cold.md"
    text = run_cold_items("tiny", params, tiny_catalog, [0], ["CAMMSR", "SASRec"], 0.25, 1, out,
                          overrides={"epochs": 1})
    assert out.read_text() == text
    assert "10 of 40 items (25%, drawn with seed 1)" in text
    assert "--cold-items 0.25 --cold-seed 1 --seeds 0 --variant 'CAMMSR' --variant 'SASRec' --epochs 1" in text
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert {"CAMMSR", "SASRec", "most-popular", "text kNN (untrained)", "image kNN (untrained)"} <= set(rows)
    assert rows["most-popular"][2:4] == ["0.0000", "0.0000"]  # never seen: count 0, below every warm item
    # the same CAMMSR checkpoint with the cold items' ID rows from their content neighbours (as recommend serves
    # them); SASRec has no content to find neighbours by
    assert "CAMMSR, cold IDs from 3 content neighbours" in rows and not any("SASRec," in r for r in rows)
    metrics = json.loads(next((tiny_catalog.root / "experiments" / "cold-items" / "cammsr").glob("*/metrics.json"))
                         .read_text())
    assert metrics["neighbour_ids"]["neighbours"] == 3 and metrics["neighbour_ids"]["imputed"] == 10
    assert metrics["neighbour_ids"]["warm"]["targets"] == metrics["warm"]["targets"]
    # another neighbour count re-ranks the cached checkpoint (no training) and is recorded with its count
    again = params.model_copy(update={"recommend": params.recommend.model_copy(update={"new_item_neighbours": 1})})
    text = run_cold_items("tiny", again, tiny_catalog, [0], ["CAMMSR"], 0.25, 1, out, overrides={"epochs": 1})
    assert "CAMMSR, cold IDs from 1 content neighbours" in text
    # a second call reuses the finished runs
    assert run_cold_items("tiny", params, tiny_catalog, [0], ["SASRec"], 0.25, 1, out, overrides={"epochs": 1})
