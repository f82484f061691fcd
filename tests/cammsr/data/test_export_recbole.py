"""The RecBole export: same order (ties included), same leave-one-out targets, checkable."""

from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from cammsr.cli import app
from cammsr.core.config import SplitParams
from cammsr.data.export_recbole import INTER_HEADER, check_targets, run_export_recbole, write_inter
from cammsr.core.paths import CatalogPaths
from cammsr.data.splits import load_splits, run_split


def _catalog(root: Path) -> CatalogPaths:
    """Two users whose same-day ties are in raw-file order, not item-id order."""
    paths = CatalogPaths.of("tie", root / "data")
    paths.root.mkdir(parents=True)
    day = 86400
    pl.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u2"],
        "item_id": ["a", "c", "b", "d", "c", "a", "b"],
        "timestamp": [5 * day, 5 * day, 3 * day, 7 * day, day, day, day],
        "rating": [5.0] * 7,
    }).write_parquet(paths.interactions)
    pl.DataFrame({"item_id": ["a", "b", "c", "d"], "category": ["x", "y", "x", "y"]}).write_parquet(paths.items)
    run_split("tie", SplitParams(user_core=1, item_core=1), paths)
    return paths


def _read_inter(path: Path) -> tuple[str, list[tuple[str, str, float]]]:
    header, *lines = path.read_text().splitlines()
    rows = [(u, i, float(t)) for u, i, t in (line.split("\t") for line in lines)]
    return header, rows


def _recbole_sequences(rows: list[tuple[str, str, float]]) -> dict[str, list[str]]:
    """What RecBole's TO ordering sees: rows sorted by (user, timestamp). The keys are unique, so
    any sort (RecBole's is not stable) gives this order; the file's own row order plays no part."""
    seqs: dict[str, list[str]] = {}
    for u, i, _ in sorted(rows[::-1], key=lambda r: (r[0], r[2])):
        seqs.setdefault(u, []).append(i)
    return seqs


def test_export_keeps_our_order_with_ties_and_gives_our_targets(tmp_path):
    paths = _catalog(tmp_path)
    s = run_export_recbole("tie", paths)
    header, rows = _read_inter(paths.root / "recbole" / "tie" / "tie.inter")
    assert header == INTER_HEADER == "user_id:token\titem_id:token\ttimestamp:float"
    # u1: b (day 3), then a and c share day 5 in raw order a, c, then d; u2: all on day 1, raw order c, a, b.
    assert rows == [("u1", "b", 0), ("u1", "a", 1), ("u1", "c", 2), ("u1", "d", 3),
                    ("u2", "c", 0), ("u2", "a", 1), ("u2", "b", 2)]
    seqs = _recbole_sequences(rows)
    assert seqs == {"u1": ["b", "a", "c", "d"], "u2": ["c", "a", "b"]}
    # RecBole's LS valid_and_test: the last item is the test target, the one before the valid target.
    test = {u: q[-1] for u, q in seqs.items()}
    valid = {u: q[-2] for u, q in seqs.items()}
    split = load_splits(paths.splits_dir)
    assert check_targets(split, "test", test).ok
    assert check_targets(split, "valid", valid).ok
    assert test == {"u1": "d", "u2": "b"} and valid == {"u1": "c", "u2": "a"}
    assert s.counts["interactions"] == 7 and s.counts["test_users"] == 2
    items = (paths.root / "recbole" / "tie" / "tie.item").read_text().splitlines()
    assert items == ["item_id:token\tcategory:token", "a\tx", "b\ty", "c\tx", "d\ty"]


def test_timestamps_are_unique_within_each_user_so_no_sort_can_reorder_ties(tiny_catalog):
    run_split("tiny", SplitParams(), tiny_catalog)
    run_export_recbole("tiny", tiny_catalog, tiny_catalog.root / "rb")
    _, rows = _read_inter(tiny_catalog.root / "rb" / "tiny" / "tiny.inter")
    per_user: dict[str, list[float]] = {}
    for u, _, t in rows:
        per_user.setdefault(u, []).append(t)
    assert all(ts == list(range(len(ts))) for ts in per_user.values())
    split = load_splits(tiny_catalog.splits_dir)
    assert _recbole_sequences(rows) == {u: [split.item_ids[i - 1] for i in s]
                                        for u, s in zip(split.user_ids, split.sequences, strict=True)}


def test_check_targets_reports_wrong_targets_histories_and_extra_users(tmp_path):
    split = load_splits(_catalog(tmp_path).splits_dir)
    wrong = check_targets(split, "test", {"u1": "d", "u2": "a"})
    assert not wrong.ok and wrong.mismatch_count == 1 and "u2" in wrong.mismatches[0]
    hist = check_targets(split, "test", {"u1": "d", "u2": "b"}, their_histories={"u1": ["b", "a", "c"],
                                                                                  "u2": ["a", "c"]})
    assert hist.mismatch_count == 1 and "u2: history differs" in hist.mismatches[0]
    extra = check_targets(split, "valid", {"u1": "c", "u2": "a", "u3": "a"})
    assert not extra.ok and extra.theirs == 3 and extra.ours == 2


def test_a_tab_in_an_id_is_refused(tmp_path):
    split = load_splits(_catalog(tmp_path).splits_dir)
    split.user_ids[0] = "bad\tid"
    with pytest.raises(ValueError, match="user_id 'bad\\\\tid'"):
        write_inter(split, tmp_path / "x.inter")


def test_cli_export_recbole(tmp_path, monkeypatch):
    _catalog(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"project": {"data_dir": str(tmp_path / "data")},
                                      "catalogs": {"tie": {"reviews": "file:unused.json.gz"}}}))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["export-recbole", "--catalog", "tie", "--params", str(params),
                                   "--out", str(tmp_path / "rb")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rb" / "tie" / "tie.inter").read_text().count("\n") == 8
    missing = CliRunner().invoke(app, ["export-recbole", "--catalog", "nope", "--params", str(params)])
    assert missing.exit_code == 2
