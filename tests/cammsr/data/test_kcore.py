import polars as pl

from cammsr.data.kcore import kcore

# u1:{a,b} u2:{a,c} u3:{c,b} u4:{a,b}  ->  item counts a:3 b:3 c:2, every user 2
ROWS = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "c"), ("u3", "c"), ("u3", "b"), ("u4", "a"), ("u4", "b")]
DF = pl.DataFrame({"user_id": [r[0] for r in ROWS], "item_id": [r[1] for r in ROWS]})


def test_kcore_keeps_everything_that_already_meets_the_thresholds():
    assert kcore(DF, user_core=2, item_core=2).equals(DF)


def test_kcore_cascades_until_stable():
    # item_core 3 drops c; u2 and u3 fall to one item and go; then a and b fall to 2 and go.
    assert kcore(DF, user_core=2, item_core=3).is_empty()
    # user_core 2, item_core 2 without u4: a and b keep 2, c keeps 2 -> nothing more drops.
    assert kcore(DF.filter(pl.col("user_id") != "u4"), 2, 2).height == 6


def test_kcore_preserves_row_order():
    df = pl.DataFrame({"user_id": ["x", "y", "x", "y", "z"], "item_id": ["i", "i", "j", "j", "i"]})
    out = kcore(df, user_core=2, item_core=2)
    assert out["user_id"].to_list() == ["x", "y", "x", "y"]
    assert out["item_id"].to_list() == ["i", "i", "j", "j"]
