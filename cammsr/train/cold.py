"""The cold-item study: hold a fraction of the items out of training entirely, then rank them.

    cammsr experiments --catalog scientific --cold-items 0.1 --cold-seed 0 --seeds 0,1,2

A seeded random fraction of the split's items becomes cold. Their interactions are removed from every
user's sequence, except where a cold item is the user's test target (the last item), which stays. The
models train on the warm items alone: the cold items are not even in the training softmax, as an item
that is added to the catalog after training is not. At test time the item table grows to hold them
(`cammsr.model.io.load_checkpoint`, the same path as serving new items after a feature refresh):

- CAMMSR ranks a cold item by its text and image through the trained projections and experts, with the
  learned unknown-ID vector in place of its ID row, and again (from the same checkpoint) with an ID row from
  its ``recommend.new_item_neighbours`` nearest warm items in content (`cammsr.model.content_neighbours`), as
  `cammsr recommend` serves new items;
- SASRec has only its ID table: every cold item gets the unknown-ID vector, an untrained row (zeros)
  unless item-ID dropout trained it, so all cold items score the same and sit together in the ranking;
- most-popular has never seen them (count 0).

Reported: HR@10 and NDCG@10 over the test targets that are cold items, beside the warm targets and all,
mean ± std over training seeds (the cold items are the same for every seed: ``--cold-seed``). Runs are
cached under ``data/NAME/experiments/cold-items/`` like the other experiments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cammsr.core.atomic import atomic_path, write_json_atomic
from cammsr.core.config import Params
from cammsr.core.device import pick_device, resolve_precision
from cammsr.core.paths import CatalogPaths
from cammsr.data.splits import SplitData, load_splits
from cammsr.evaluate.baselines import baseline_rankers, label
from cammsr.evaluate.metrics import metrics_from_ranks
from cammsr.evaluate.ranking import model_scores, rank_targets
from cammsr.model.content_neighbours import NEIGHBOUR_TEMPERATURE, impute_new_item_ids
from cammsr.model.io import load_checkpoint
from cammsr.train.experiments import VARIANTS, feature_source, slug
from cammsr.train.trainer import run_train

log = logging.getLogger(__name__)

K = 10
DEFAULT_VARIANTS = ["CAMMSR", "SASRec"]
PARTS = ("cold", "warm", "all")


@dataclass
class ColdSplit:
    """A split with some items held out of training, re-indexed: warm items 1..W, cold items W+1..N.

    Attributes:
        train: the warm items only, what training sees (its sequences' last items, the test targets,
            may be cold indices past W: training never reads them).
        full: warm then cold items, the same sequences: what the test ranks over.
        num_warm: W.
        cold_ids: the cold items' ids (``full.item_ids[W:]``).
    """

    train: SplitData
    full: SplitData
    num_warm: int
    cold_ids: list[str]

    def test(self, max_len: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Test histories, targets (indices into ``full``) and whether each target is cold."""
        hist, targets, _ = self.full.held_out("test", max_len)
        return hist, targets, targets > self.num_warm


def make_cold_split(split: SplitData, fraction: float, seed: int) -> ColdSplit:
    """Hold ``fraction`` of ``split``'s items (drawn with ``seed``) out of training.

    Each user's sequence loses its cold items, except a cold last item (the test target). A user with at
    least 3 items whose remaining history has at least 2 keeps ``history + [test target]`` (train, valid,
    test as in leave-one-out; the valid target is the last warm item); any other user keeps only their
    warm items, for training (no held-out target, as for short sequences in the split).

    Raises:
        ValueError: ``fraction`` holds out no item or every item.
    """
    n = split.num_items
    n_cold = int(round(fraction * n))
    if not 0 < n_cold < n:
        raise ValueError(f"cold-item fraction {fraction} of {n} items holds out {n_cold}: expected 1..{n - 1}")
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(np.arange(1, n + 1), size=n_cold, replace=False))
    is_cold = np.zeros(n + 1, dtype=bool)
    is_cold[cold] = True
    warm = np.flatnonzero(~is_cold[1:]) + 1
    order = np.concatenate([warm, cold])  # new index i (1-based) holds old item order[i - 1]
    new_index = np.zeros(n + 1, dtype=np.int64)
    new_index[order] = np.arange(1, n + 1)

    sequences = []
    for s in split.sequences:
        history = s[:-1][~is_cold[s[:-1]]]
        held_out = len(s) >= 3 and len(history) >= 2
        sequences.append(new_index[np.concatenate([history, s[-1:]]) if held_out else s[~is_cold[s]]])
    item_ids = [split.item_ids[i - 1] for i in order]
    item_category = np.concatenate([[-1], split.item_category[order]]).astype(np.int64)
    w = len(warm)
    full = SplitData(item_ids, item_category, split.category_names, sequences, split.user_ids)
    train = SplitData(item_ids[:w], item_category[:w + 1], split.category_names, sequences, split.user_ids)
    return ColdSplit(train, full, w, item_ids[w:])


def part_metrics(ranks: np.ndarray, is_cold: np.ndarray) -> dict[str, dict[str, float]]:
    """HR/NDCG@10 (and the number of targets) over the cold targets, the warm targets and all of them."""
    out = {}
    for part, mask in (("cold", is_cold), ("warm", ~is_cold), ("all", np.ones_like(is_cold))):
        m = metrics_from_ranks(ranks[mask], [K])
        out[part] = {f"hr@{K}": round(m[f"hr@{K}"], 6), f"ndcg@{K}": round(m[f"ndcg@{K}"], 6),
                     "targets": int(mask.sum())}
    return out


def _cold_metrics(model, cold: ColdSplit, params: Params, device) -> dict[str, dict[str, float]]:
    """`part_metrics` of ``model`` (loaded on ``cold.full``) over the test targets."""
    model.to(device).eval()
    hist, targets, is_cold = cold.test(params.splits.max_seq_len)
    precision = resolve_precision(params.evaluate.precision, device, auto_on=("cpu",))  # exact ranks either way
    ranks = rank_targets(model_scores(model), hist, targets, params.evaluate.batch_size,
                         params.evaluate.mask_history, device, precision, cap=K)
    return part_metrics(ranks, is_cold)


def run_cold_variant(name: str, variant: str, seed: int, params: Params, paths: CatalogPaths, cold: ColdSplit,
                     key: str, out_dir: Path, overrides: dict | None = None) -> dict:
    """Train ``variant`` on the warm items with ``seed``, rank the test targets over all items, with the
    unknown-ID vector for the cold items and (``"neighbour_ids"``) with ID rows from their
    ``recommend.new_item_neighbours`` content neighbours as serving gives them; cached."""
    train = params.train.model_copy(update={**VARIANTS[variant], **(overrides or {})})
    project = params.project.model_copy(update={"seed": seed})
    run_key = json.dumps([train.model_dump(), params.splits.model_dump(), params.evaluate.model_dump(),
                          params.features.model_dump(), seed, key], sort_keys=True, default=str)
    digest = hashlib.sha256(run_key.encode()).hexdigest()[:10]
    run_paths = paths.for_run(out_dir / slug(variant) / f"seed{seed}-{digest}")
    device = pick_device(project.device)
    model = None  # a fresh run's model, loaded once for both measurements
    if not run_paths.metrics.exists():
        run_train(name, train, params.splits, params.evaluate, project, run_paths, split=cold.train)
        model, ckpt = load_checkpoint(run_paths.checkpoint, cold.full, run_paths, map_location=device)
        tsum = json.loads(run_paths.summary("train").read_text())["counts"]
        write_json_atomic(run_paths.metrics, {"variant": variant, "seed": seed, "epochs": tsum["epochs_run"],
                                              "best_epoch": int(ckpt.get("epoch", -1)),
                                              **_cold_metrics(model, cold, params, device)})
    metrics = json.loads(run_paths.metrics.read_text())
    k = params.recommend.new_item_neighbours
    if k > 0 and metrics.get("neighbour_ids", {}).get("neighbours") != k:  # not yet measured with this k
        if model is None:
            model, _ = load_checkpoint(run_paths.checkpoint, cold.full, run_paths, map_location=device)
        imputed = impute_new_item_ids(model, cold.num_warm, k)
        parts = _cold_metrics(model, cold, params, device) if imputed else {}
        metrics["neighbour_ids"] = {"neighbours": k, "imputed": imputed, **parts}
        write_json_atomic(run_paths.metrics, metrics)
    return metrics


def _cell(values: list[float]) -> str:
    v = np.array(values)
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"


def cold_table(runs: dict[str, list[dict]], baselines: dict[str, dict]) -> str:
    """Markdown: one row per ranker, HR/NDCG@10 on cold, warm and all test targets, mean ± std over seeds;
    the untrained ``baselines`` ({label: metrics}) one row each, no seed."""
    cols = [(part, m) for part in PARTS for m in (f"hr@{K}", f"ndcg@{K}")]
    header = ["ranker", "seeds", *[f"{part} {m.upper()}" for part, m in cols], "epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, results in runs.items():
        cells = [variant, str(len(results)), *[_cell([r[p][m] for r in results]) for p, m in cols],
                 f"{np.mean([r['epochs'] for r in results]):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for name, metrics in baselines.items():
        lines.append("| " + " | ".join([name, "-", *[f"{metrics[p][m]:.4f}" for p, m in cols], "-"]) + " |")
    return "\n".join(lines)


def run_cold_items(name: str, params: Params, paths: CatalogPaths, seeds: list[int], variants: list[str],
                   fraction: float, cold_seed: int, out: Path, overrides: dict | None = None) -> str:
    """Run the cold-item study for every variant x seed (finished runs are reused); write the report to ``out``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    t0 = time.perf_counter()
    cold = make_cold_split(load_splits(paths.splits_dir), fraction, cold_seed)
    hist, targets, is_cold = cold.test(params.splits.max_seq_len)
    # most-popular and content kNN (it ranks a cold item by its text or image like any other): no training
    baselines = {label(r): part_metrics(rank_targets(fn, hist, targets, params.evaluate.batch_size,
                                                     params.evaluate.mask_history), is_cold)
                 for r, fn in baseline_rankers(cold.full, paths).items()}
    key = f"cold fraction {fraction} seed {cold_seed}"
    runs: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in seeds:
            log.info("cold items: %s seed %d", variant, seed)
            runs.setdefault(variant, []).append(run_cold_variant(
                name, variant, seed, params, paths, cold, key, paths.root / "experiments" / "cold-items", overrides))
    k = params.recommend.new_item_neighbours
    for variant in variants:  # the same checkpoints with the cold items' ID rows from their content neighbours
        imputed = [{**r["neighbour_ids"], "epochs": r["epochs"]} for r in runs[variant]
                   if k > 0 and r.get("neighbour_ids", {}).get("imputed")]
        if len(imputed) == len(runs[variant]):
            runs[f"{variant}, cold IDs from {k} content neighbours"] = imputed
    train = params.train.model_copy(update=overrides or {})
    catalog = params.catalog(name)
    extra = f" --epochs {overrides['epochs']}" if overrides and "epochs" in overrides else ""
    command = (f"cammsr experiments --catalog {name} --cold-items {fraction} --cold-seed {cold_seed} "
               f"--seeds {','.join(map(str, seeds))}" + "".join(f" --variant '{v}'" for v in variants) + extra)
    text = "\n".join([
        f"# {name}: cold items", "",
        f"{len(cold.cold_ids)} of {cold.full.num_items} items ({fraction:.0%}, drawn with seed {cold_seed}) are "
        f"held out of training entirely: their interactions are removed from every sequence and kept only as "
        f"test targets. {int(is_cold.sum())} of the {len(targets)} test targets are cold items. The models "
        f"train on the {cold.num_warm} warm items (the cold ones are not in the training softmax) and rank "
        f"the test targets over all {cold.full.num_items} items: CAMMSR scores a cold item from its text and "
        f"image with the unknown-ID vector in place of its ID row (rows \"cold IDs from {k} content "
        f"neighbours\": the same checkpoints, each cold item's ID row the softmax(cos / "
        f"{NEIGHBOUR_TEMPERATURE})-weighted mean of those of the {k} warm items most like it in content, as "
        f"`cammsr recommend` serves new items), SASRec has only the unknown-ID vector (the same score for every "
        f"cold item), most-popular has count 0 for them, the content kNN baselines "
        f"(no training) rank every item by its features' similarity to the user's last three items. Ties "
        f"count against the target.", "",
        f"Full ranking, history {'masked' if params.evaluate.mask_history else 'not masked'}; mean ± std over "
        f"training seeds {seeds}; model selection on validation NDCG@10 (warm targets) with patience "
        f"{train.patience}, at most {train.epochs} epochs; item-ID dropout {train.id_dropout} unless the "
        f"variant sets it. Text features: {feature_source(params, name, 'text', paths)}; image features: "
        f"{feature_source(params, name, 'image', paths)}.", "",
        f"Catalog `{name}`: reviews `{catalog.reviews}`, metadata `{catalog.meta}`; split "
        f"{params.splits.user_core}/{params.splits.item_core}-core, {len(cold.full.user_ids)} users. "
        f"Reproduce (after `dvc repro split_features@{name}`): `{command}` "
        f"({time.perf_counter() - t0:.0f} s for the runs not already cached).", "",
        cold_table(runs, baselines), "",
    ])
    with atomic_path(out, suffix=".md") as tmp:
        tmp.write_text(text)
    return text

