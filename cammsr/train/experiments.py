"""The paper's study as one command: CAMMSR vs SASRec, ablations and category noise, over seeds.

    cammsr experiments --catalog demo --seeds 0,1,2

Every variant is the same trainer and evaluator with switches from `VARIANTS` applied to the
``train`` section of params.yaml, on the catalog's existing split and feature stores (run
``dvc repro split@NAME encode_text@NAME encode_image@NAME`` first). Each run writes under
``data/NAME/experiments/<variant>/seed<k>/``; the comparison is a markdown table.
The same variants run as DVC experiments: ``dvc exp run -S train.swap_cl=false``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from cammsr.core.atomic import atomic_path, write_json_atomic
from cammsr.core.config import Params, TrainParams
from cammsr.core.paths import CatalogPaths
from cammsr.evaluate.baselines import label
from cammsr.evaluate.stage import EVALUATION_VERSION, run_evaluate
from cammsr.train.trainer import run_train

log = logging.getLogger(__name__)

# name -> overrides of the train section. The first row is the reference for relative differences.
VARIANTS: dict[str, dict[str, object]] = {
    "CAMMSR": {},
    "SASRec": {"model": "sasrec"},
    # SASRec at its own validation-best lr and dropout (the same search as CAMMSR's; docs/DEPARTURES.md)
    "SASRec, tuned": {"model": "sasrec", "lr": 5e-4, "dropout": 0.3},
    "w/o category guidance": {"category_guidance": False},
    "w/o swap-CL": {"swap_cl": False},
    "LayerNorm instead of DyT": {"norm": "layernorm"},
    "text-only": {"use_id": False, "use_image": False},
    "image-only": {"use_id": False, "use_text": False},
    "ID-only": {"use_text": False, "use_image": False},
    "learned content table": {"content_table": "learned"},
    "w/o modality dropout": {"modality_dropout": 0.0},
    "category noise 10%": {"category_noise": 0.1},
    "category noise 20%": {"category_noise": 0.2},
    "item-ID dropout 0.1": {"id_dropout": 0.1},  # trains the unknown-ID vector (new and cold items)
}
METRICS = [f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)]


@dataclass
class RunResult:
    variant: str
    seed: int
    test: dict[str, float]
    epoch_seconds: float
    epochs: int
    valid: dict[str, float] = field(default_factory=dict)
    test_other: dict[str, float] = field(default_factory=dict)  # the test under the other masking protocol
    tail: dict[str, float] = field(default_factory=dict)  # test targets seen < 5 times in training
    tail_users: int = 0
    fused: dict[str, float] = field(default_factory=dict)  # test NDCG@10 of model + content kNN, by kNN ranker
    train_seconds: float = 0.0  # wall time of the run's training (when it ran, cached or not)
    # the untrained baselines its evaluate stage measured on the same split: {ranker: (test, other, tail NDCG@10)}
    baselines: dict[str, tuple[float, float, float | None]] = field(default_factory=dict)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def run_variant(name: str, variant: str, seed: int, params: Params, paths: CatalogPaths,
                out_dir: Path, overrides: dict | None = None) -> RunResult:
    """Train and evaluate one variant with one seed; results are cached in the run's metrics.json.

    The run folder is keyed by a hash of everything that shapes the result (train, splits, evaluate
    and feature params), so a changed config never reuses a stale run. A finished run whose metrics an older
    evaluate stage wrote (``evaluation_version``) is evaluated again from its checkpoint, not retrained.
    """
    train = params.train.model_copy(update={**VARIANTS[variant], **(overrides or {})})
    project = params.project.model_copy(update={"seed": seed})
    key = json.dumps([train.model_dump(), params.splits.model_dump(), params.evaluate.model_dump(),
                      params.features.model_dump(), seed], sort_keys=True, default=str)
    run_paths = paths.for_run(out_dir / slug(variant) / f"seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    if not run_paths.metrics.exists():
        run_train(name, train, params.splits, params.evaluate, project, run_paths)
        run_evaluate(name, params.splits, params.evaluate, project, run_paths)
        write_json_atomic(run_paths.out_root / "run.json", {"variant": variant, "seed": seed,
                                                            "train": train.model_dump(mode="json")})
    elif json.loads(run_paths.metrics.read_text()).get("evaluation_version") != EVALUATION_VERSION:
        run_evaluate(name, params.splits, params.evaluate, project, run_paths)
    metrics = json.loads(run_paths.metrics.read_text())
    train_summary = json.loads(run_paths.summary("train").read_text())
    tsum = train_summary["counts"]
    model = metrics["model"]
    other = next((v for k, v in model.items() if k.startswith("test_history_")), {})
    tail = metrics.get("by_target_popularity", {}).get("tail", {})
    return RunResult(variant, seed, model["test"], float(tsum["epoch_seconds"]), int(tsum["epochs_run"]),
                     valid=model.get("valid", {}), test_other=other, tail=tail.get("model", {}),
                     tail_users=int(tail.get("users", 0)),
                     fused={k.split("+", 1)[1]: v["test"]["ndcg@10"] for k, v in metrics.items()
                            if k.startswith("model+") and isinstance(v, dict)},
                     train_seconds=float(train_summary.get("seconds", 0.0)),
                     baselines={r: (v["test"]["ndcg@10"], next((o["ndcg@10"] for k, o in v.items()
                                                                 if k.startswith("test_history_")), float("nan")),
                                    tail.get(r, {}).get("ndcg@10"))
                                for r in ("popularity", "text_knn", "image_knn") if (v := metrics.get(r))})


def _mean_std(values: list[float]) -> str:
    vals = np.array(values, dtype=float)
    return f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.4f}"


def comparison_table(results: list[RunResult], reference: str = "CAMMSR", masked: bool = False) -> str:
    """Markdown: one row per variant, mean ± std over seeds, epoch time, relative NDCG@10 difference.

    Besides the test metrics (protocol of ``masked``): test NDCG@10 under the other history-masking
    protocol, on the tail targets (seen < 5 times in training), the validation NDCG@10 that selected
    the epoch, and the test NDCG@10 of the run's late fusion with each content kNN (weight on validation).
    """
    by_variant: dict[str, list[RunResult]] = {}
    for r in results:
        by_variant.setdefault(r.variant, []).append(r)
    ref = by_variant.get(reference)
    ref_ndcg = float(np.mean([r.test["ndcg@10"] for r in ref])) if ref else None
    other = "NDCG@10 unmasked" if masked else "NDCG@10 masked"
    fused = sorted({k for r in results for k in r.fused}, key=lambda k: (k != "text_knn", k))  # text first
    header = ["variant", "seeds", *[m.upper() for m in METRICS], other, "tail NDCG@10", "valid NDCG@10",
              *[f"NDCG@10 + {label(k)}" for k in fused], "epoch s", "epochs", "NDCG@10 vs " + reference]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, runs in by_variant.items():
        cells = [variant, str(len(runs)), *[_mean_std([r.test[m] for r in runs]) for m in METRICS]]
        for part in ("test_other", "tail", "valid"):
            vals = [getattr(r, part).get("ndcg@10") for r in runs]
            cells.append(_mean_std(vals) if all(v is not None for v in vals) else "-")
        for k in fused:
            vals = [r.fused.get(k) for r in runs]
            cells.append(_mean_std(vals) if all(v is not None for v in vals) else "-")
        cells.append(f"{np.mean([r.epoch_seconds for r in runs]):.2f}")
        cells.append(f"{np.mean([r.epochs for r in runs]):.0f}")
        ndcg = float(np.mean([r.test["ndcg@10"] for r in runs]))
        cells.append("reference" if variant == reference else
                     (f"{100 * (ndcg - ref_ndcg) / ref_ndcg:+.1f}%" if ref_ndcg else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def feature_source(params: Params, name: str, modality: str, paths: CatalogPaths | None = None) -> str:
    """Where a catalog's features of ``modality`` come from, in words ("none" when the split's store is empty)."""
    store = paths.split_features(modality) if paths is not None else None
    if store is not None and store.exists() and pq.read_metadata(store).num_rows == 0:
        return "none (no item of the catalog has any)"
    pre = params.catalog(name).precomputed(modality)
    if pre is not None:
        return f"imported from `{pre.file.rsplit('/', 1)[-1]}`" + (f" ({pre.provenance})" if pre.provenance else "")
    if modality == "text":
        return f"`{params.features.text.model}`"
    image = params.features.image
    return f"`{image.model}` (pretrained: {image.pretrained}{' = RANDOM weights' if image.pretrained is None else ''})"


# ablations of what the paper proposes -> the component they remove; the paper expects each to lower NDCG@10
PAPER_ABLATIONS = {
    "w/o category guidance": "the category guidance", "w/o swap-CL": "the modality-swap contrastive loss",
    "LayerNorm instead of DyT": "DynamicTanh (LayerNorm in its place)", "ID-only": "text and image",
    "text-only": "the ID and image", "image-only": "the ID and text",
}


def _ndcg_stats(results: list[RunResult], variant: str) -> tuple[float, float] | None:
    """Mean and standard deviation over seeds of ``variant``'s test NDCG@10; None without runs."""
    vals = np.array([r.test["ndcg@10"] for r in results if r.variant == variant], dtype=float)
    if len(vals) == 0:
        return None
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0


def ablation_lines(results: list[RunResult], model: str = "CAMMSR") -> list[str]:
    """One line per ablation of a paper component that ran: whether removing it lowered test NDCG@10 (the
    paper's direction), beyond or within the sum of the standard deviations, or did not."""
    ours, lines = _ndcg_stats(results, model), []
    for variant, component in PAPER_ABLATIONS.items():
        other = _ndcg_stats(results, variant)
        if ours is None or other is None or ours[0] == 0:
            continue
        drop, noise = ours[0] - other[0], ours[1] + other[1]
        head = f"- {variant}: {other[0]:.4f} vs {ours[0]:.4f} ({-100 * drop / ours[0]:+.1f}%): "
        if drop > noise:
            lines.append(head + f"removing {component} lowers NDCG@10, beyond noise: the paper's direction.")
        elif drop > 0:
            lines.append(head + f"removing {component} lowers NDCG@10 within noise (the sum of the standard "
                         f"deviations is {noise:.4f}): the paper's direction, not shown beyond noise.")
        else:
            lines.append(head + f"removing {component} does not lower NDCG@10 here: not the paper's direction.")
    return lines


def verdict(results: list[RunResult], model: str = "CAMMSR", baselines: tuple[str, ...] = ("SASRec",)) -> list[str]:
    """One line per baseline run beside ``model``: relative test NDCG@10 difference and whether the
    difference of the means exceeds the sum of their standard deviations (over seeds)."""
    ours, lines = _ndcg_stats(results, model), []
    for base in baselines:
        other = _ndcg_stats(results, base)
        if ours is None or other is None or other[0] == 0:
            continue
        diff, noise = ours[0] - other[0], ours[1] + other[1]
        where = "beyond" if abs(diff) > noise else "within"
        lines.append(f"- {model} vs {base}: test NDCG@10 {ours[0]:.4f} vs {other[0]:.4f}, "
                     f"{100 * diff / other[0]:+.1f}% ({diff:+.4f}, {where} the sum of their stds {noise:.4f}).")
    return lines


def baseline_lines(results: list[RunResult], masked: bool = False) -> list[str]:
    """One line per untrained baseline (test NDCG@10, under the other protocol, on the tail), as the runs'
    evaluate stage measured it on the same split: seed-free, so read from the first run that has it."""
    source = next((r for r in results if r.baselines), None)
    if source is None:
        return []
    other = "unmasked" if masked else "masked"
    return [f"- {label(r)}: test NDCG@10 {test:.4f}, {other} {alt:.4f}"
            + (f", tail {tail:.4f}" if tail is not None else "") for r, (test, alt, tail) in source.baselines.items()]


def train_overrides(assignments: list[str], train: TrainParams) -> dict[str, object]:
    """``["lr=0.002", "use_text=false"]`` -> typed overrides of the train section (validated against it).

    Raises:
        ValueError: not ``key=value``, an unknown key, or a value of the wrong type (names the key).
    """
    raw: dict[str, object] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value, e.g. lr=0.002")
        raw[key.strip()] = yaml.safe_load(value)
    unknown = [k for k in raw if k not in TrainParams.model_fields]
    if unknown:
        raise ValueError(f"--set: unknown train params {unknown}")
    checked = TrainParams.model_validate({**train.model_dump(), **raw})
    return {k: getattr(checked, k) for k in raw}


def run_experiments(name: str, params: Params, paths: CatalogPaths, seeds: list[int], variants: list[str],
                    out: Path, overrides: dict | None = None) -> str:
    """Run every variant x seed (skipping finished runs), write the markdown report to ``out``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    t0 = time.perf_counter()
    out_dir = paths.root / "experiments"
    results = []
    for variant in variants:
        for seed in seeds:
            log.info("experiment %s seed %d", variant, seed)
            results.append(run_variant(name, variant, seed, params, paths, out_dir, overrides))
    table = comparison_table(results, masked=params.evaluate.mask_history)
    train = params.train.model_copy(update=overrides or {})
    extra = "".join(f" --epochs {v}" if k == "epochs" else f" --set {k}={v}" for k, v in (overrides or {}).items())
    tail_users = max((r.tail_users for r in results), default=0)
    ablations = ablation_lines(results)
    text = "\n".join([
        f"# {name}: CAMMSR study", "",
        f"Test metrics, full ranking over all items, leave-one-out, history "
        f"{'masked' if params.evaluate.mask_history else 'not masked'}; mean ± std over seeds {seeds}. "
        f"Model selection on validation NDCG@10 with patience {train.patience}, at most {train.epochs} epochs; "
        + (f"{train.batch_targets} targets per step" if train.batch_targets else f"batch {train.batch_size}")
        + f", lr {train.lr}, d {train.hidden_size}. "
        f"Text features: {feature_source(params, name, 'text', paths)}; "
        f"image features: {feature_source(params, name, 'image', paths)}.", "",
        f"Tail: the {tail_users} test targets seen fewer than 5 times in training. "
        "Valid NDCG@10 is the selection metric of each run's best epoch.", "",
        f"Reproduce: `cammsr experiments --catalog {name} --seeds {','.join(map(str, seeds))}"
        f"{''.join(f' --variant {v!r}' for v in variants) if variants != list(VARIANTS) else ''}{extra}` "
        f"({sum(r.train_seconds for r in results):.0f} s of training for all {len(results)} runs; this call "
        f"took {time.perf_counter() - t0:.0f} s, finished runs are reused).", "",
        *verdict(results, baselines=tuple(v for v in variants if v.startswith("SASRec"))), "",
        table, "",
        *(["Ablations of what the paper proposes, test NDCG@10 without it vs CAMMSR (the paper expects each "
           "removal to lower it):", "", *ablations, ""] if ablations else []),
        "Untrained baselines on the same split and protocol (no seed; `cammsr.evaluate.baselines`): "
        "most-popular, and content nearest neighbours (items on their features' top principal directions, "
        "scored by similarity to the user's last three items) where the catalog has text or image features.", "",
        *baseline_lines(results, params.evaluate.mask_history), "",
    ])
    with atomic_path(out, suffix=".md") as tmp:
        tmp.write_text(text)
    return text
