"""Iterative k-core filtering of an interaction table."""

from __future__ import annotations

import polars as pl


def kcore(interactions: pl.DataFrame, user_core: int, item_core: int, max_rounds: int = 100) -> pl.DataFrame:
    """Keep interactions whose user has >= ``user_core`` and item >= ``item_core`` interactions.

    Dropping a user can push an item below its threshold and vice versa, so the filter repeats
    until nothing changes. Row order is preserved (the split's tie-break depends on it).
    """
    df = interactions
    for _ in range(max_rounds):
        before = df.height
        df = df.filter(
            (pl.len().over("user_id") >= user_core) & (pl.len().over("item_id") >= item_core)
        )
        # One filter over both counts can leave a user short after its items were dropped: repeat.
        if df.height == before:
            return df
    raise RuntimeError(f"k-core did not converge in {max_rounds} rounds ({df.height} rows left)")
