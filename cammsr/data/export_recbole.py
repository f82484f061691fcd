"""Our split as RecBole atomic files, so RecBole trains and tests on exactly our data.

    cammsr export-recbole --catalog toys [--out DIR]

RecBole reads ``DIR/NAME/NAME.inter`` (tab-separated, typed header). Run it with

    eval_args: {order: TO, split: {LS: valid_and_test}, group_by: user, mode: full}
    load_col: {inter: [user_id, item_id, timestamp]}

and its leave-one-out gives the same valid and test targets as ours. Amazon timestamps are whole
days, so a user's items often share one; RecBole sorts by time with a sort that is not stable,
so the raw times would let it reorder ties. The ``timestamp`` we write is therefore each
interaction's **rank within its user's sequence** (0, 1, 2, ...): unique per user and in exactly
the order our split uses (ties broken by the raw file's order). The real times are not exported.
`check_targets` compares RecBole's held-out targets with ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cammsr.core.atomic import atomic_path
from cammsr.core.paths import CatalogPaths
from cammsr.data.splits import SplitData, load_splits
from cammsr.core.summary import StageSummary

log = logging.getLogger(__name__)

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token\tcategory:token"
_FORBIDDEN = ("\t", "\n", "\r")


def _token(value: str, what: str) -> str:
    """A RecBole token: any string without the atomic-file separators."""
    if any(c in value for c in _FORBIDDEN):
        raise ValueError(f"{what} {value!r} holds a tab or newline: it cannot be a RecBole token")
    return value


def write_inter(split: SplitData, path: Path) -> int:
    """Write ``NAME.inter``: users in our user order, each user's items in our chronological order.

    Returns the number of interactions written. ``timestamp`` is the rank within the user (see module doc).
    """
    rows = 0
    with atomic_path(path, suffix=".inter") as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write(INTER_HEADER + "\n")
        for user, seq in zip(split.user_ids, split.sequences, strict=True):
            u = _token(user, "user_id")
            fh.writelines(f"{u}\t{_token(split.item_ids[i - 1], 'item_id')}\t{t}\n" for t, i in enumerate(seq))
            rows += len(seq)
    return rows


def write_items(split: SplitData, path: Path) -> int:
    """Write ``NAME.item``: each item's category label (unused by SASRec; there for feature-aware models)."""
    with atomic_path(path, suffix=".item") as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write(ITEM_HEADER + "\n")
        for i, item in enumerate(split.item_ids, start=1):
            cat = split.category_names[split.item_category[i]]
            fh.write(f"{_token(item, 'item_id')}\t{_token(cat, 'category')}\n")
    return split.num_items


def export_dir(paths: CatalogPaths, out: str | Path | None = None) -> Path:
    """RecBole's ``data_path`` for this catalog: ``out`` or ``data/NAME/recbole``."""
    return Path(out) if out is not None else paths.root / "recbole"


def run_export_recbole(name: str, paths: CatalogPaths, out: str | Path | None = None) -> StageSummary:
    """Export the split of catalog ``name`` to ``<data_path>/NAME/NAME.{inter,item}``."""
    t0 = time.perf_counter()
    if not (paths.splits_dir / "sequences.parquet").exists():
        raise FileNotFoundError(f"{paths.splits_dir}: no split (run `cammsr split --catalog {name}` first)")
    split = load_splits(paths.splits_dir)
    data_path = export_dir(paths, out)
    folder = data_path / name
    rows = write_inter(split, folder / f"{name}.inter")
    write_items(split, folder / f"{name}.item")
    held_out = sum(len(s) >= 3 for s in split.sequences)
    summary = StageSummary(
        stage="export_recbole", catalog=name,
        counts={"users": len(split.sequences), "items": split.num_items, "interactions": rows,
                "test_users": held_out, "data_path": str(data_path)},
        seconds=time.perf_counter() - t0,
        notes=[f"RecBole: data_path={data_path} dataset={name}, eval_args order TO, split LS valid_and_test; "
               "timestamp = rank within user (ties keep our split's order)"],
    )
    summary.write(paths.summary("export_recbole"))
    return summary


@dataclass
class TargetCheck:
    """How RecBole's held-out targets compare with ours."""

    part: str
    ours: int  # users with a target in our split
    theirs: int  # users with a target in RecBole's
    mismatches: list[str]  # "user: ours X, recbole Y" (at most 10 listed)
    mismatch_count: int

    @property
    def ok(self) -> bool:
        return self.mismatch_count == 0 and self.ours == self.theirs


def check_targets(split: SplitData, part: str, theirs: Mapping[str, str], max_len: int | None = None,
                  their_histories: Mapping[str, list[str]] | None = None) -> TargetCheck:
    """Compare RecBole's targets (user token -> item token) of ``part`` with our leave-one-out.

    With ``their_histories`` (user token -> item tokens RecBole feeds the model) the histories
    are compared too (truncated to ``max_len``, as both sides do).
    """
    hist, targets, rows = split.held_out(part, max_len or 10**9)
    bad: list[str] = []
    count = 0
    seen = 0
    for h, t, u in zip(hist, targets, rows, strict=True):
        user = split.user_ids[u]
        ours = split.item_ids[t - 1]
        got = theirs.get(user)
        seen += got is not None
        problem = None
        if got != ours:
            problem = f"{user}: target ours {ours}, recbole {got}"
        elif their_histories is not None:
            our_hist = [split.item_ids[i - 1] for i in h]
            if their_histories.get(user) != our_hist:
                problem = f"{user}: history differs (ours {len(our_hist)} items)"
        if problem:
            count += 1
            if len(bad) < 10:
                bad.append(problem)
    extra = len(theirs) - seen
    if extra > 0:
        count += extra
        bad.append(f"{extra} users have a RecBole {part} target but none in our split")
    return TargetCheck(part, len(rows), len(theirs), bad, count)
