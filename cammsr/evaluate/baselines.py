"""Untrained reference rankers, evaluated beside the model on the same split and protocol.

- ``popularity``: most-popular by training count (`cammsr.evaluate.ranking.popularity_scorer`).
- ``text_knn`` / ``image_knn``: content nearest neighbours. Each item is its frozen features (centred, unit
  length, as the model reads them) on their top CONTENT_KNN_DIMS principal directions; a user is the
  weighted sum of their last items' rows (weights CONTENT_KNN_TAPS, newest first); the score is the dot
  product. No training and no ID: it says how far plain content similarity to what a user just bought
  goes, which is the bar a multimodal model's content pathway has to clear, in the tail above all.
- ``model+text_knn`` / ``model+image_knn``: late fusion, the trained model's score plus beta x the content
  kNN's, beta picked on validation NDCG@10 from FUSION_BETAS. What it adds over the model is content signal
  the model leaves unused; for an ID-only model (SASRec) it is the cheapest multimodal baseline there is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from cammsr.core.paths import CatalogPaths
from cammsr.data.splits import SplitData
from cammsr.evaluate.metrics import metrics_from_ranks
from cammsr.evaluate.ranking import FactoredScores, ScoreFn, popularity_scorer
from cammsr.model.io import item_features, split_stores

CONTENT_KNN_DIMS = 64  # principal directions kept (the model's width); on scientific-mm neither the full
# feature width nor whitened directions ranked better
CONTENT_KNN_TAPS = (1.0, 0.5, 0.25)  # weights of the last, second-to-last and third-to-last items
FUSION_BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # weights of the kNN score tried on validation (0 = the model)


def content_knn_scorer(features: torch.Tensor, present: torch.Tensor, dims: int = CONTENT_KNN_DIMS,
                       taps: Sequence[float] = CONTENT_KNN_TAPS) -> FactoredScores | None:
    """Content kNN over ``features`` [N+1, D] (row 0 = padding) with ``present`` [N+1]; None when fewer than
    two items have features. Items without features score 0 (they are like nothing)."""
    if int(present.sum()) < 2 or features.shape[1] == 0:
        return None
    x = features[present].double()
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)  # [min(n, D), D]
    table = (features.double() @ vh[:dims].T).float()  # [N+1, dims]
    table[~present] = 0.0
    weights = torch.tensor(list(taps), dtype=table.dtype)

    def users(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        back = torch.arange(len(weights), device=seq.device)  # [T] steps back from the last item
        pos = lengths[:, None] - 1 - back  # [B, T]
        rows = seq.gather(1, pos.clamp_min(0)) * (pos >= 0)  # [B, T] item indices, 0 (padding row) before the start
        return (table.to(seq.device)[rows] * weights.to(seq.device)[:, None]).sum(1)  # [B, dims]

    return FactoredScores(users, table)


def baseline_rankers(split: SplitData, paths: CatalogPaths) -> dict[str, ScoreFn]:
    """``{"popularity": ..., "text_knn": ..., "image_knn": ...}`` for ``split`` (a content kNN only where the
    split's feature store has at least two items)."""
    rankers: dict[str, ScoreFn] = {"popularity": popularity_scorer(split.train_sequences(), split.num_items)}
    feats = item_features(split_stores(paths), split.item_ids, "center_l2")
    for modality in ("text", "image"):
        scorer = content_knn_scorer(*feats[modality])
        if scorer is not None:
            rankers[f"{modality}_knn"] = scorer
    return rankers


BASELINE_LABELS = {"popularity": "most-popular", "text_knn": "text kNN (untrained)",
                   "image_knn": "image kNN (untrained)", "model+text_knn": "model + text kNN",
                   "model+image_knn": "model + image kNN"}


def label(ranker: str, model_name: str = "model") -> str:
    """How a ranker key of metrics.json reads in tables."""
    if ranker == "model":
        return model_name
    return BASELINE_LABELS.get(ranker, ranker).replace("model", model_name, 1)


def remembered(scorer: FactoredScores) -> FactoredScores:
    """``scorer`` with its user vectors remembered per batch of sequences: ranking the same users again
    (the late fusion at every weight tried, the model and its fusions on the same part) encodes them once."""
    seen: dict[tuple[bytes, bytes], torch.Tensor] = {}

    def users(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        key = (seq.cpu().numpy().tobytes(), lengths.cpu().numpy().tobytes())
        if key not in seen:
            seen[key] = scorer.users(seq, lengths)
        return seen[key]

    return FactoredScores(users, scorer.items)


def late_fusion(model: FactoredScores, knn: FactoredScores, beta: float) -> FactoredScores:
    """Scores model + ``beta`` x content kNN, still a dot product (user and item vectors side by side), so
    it ranks exactly as any factored scorer."""
    def users(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.users(seq, lengths).float(), beta * knn.users(seq, lengths)], dim=1)

    return FactoredScores(users, torch.cat([model.items.float(), knn.items.to(model.items.device)], dim=1))


def best_fusion_beta(model: FactoredScores, knn: FactoredScores, rank: Callable[[ScoreFn], np.ndarray],
                     k: int = 10) -> tuple[float, dict[float, float]]:
    """The FUSION_BETAS weight whose `late_fusion` ranks best by NDCG@``k`` (the smallest on ties), and the
    NDCG@``k`` of each; ``rank`` gives a scorer's 0-based ranks of the held-out (validation) targets."""
    ndcg = {b: metrics_from_ranks(rank(late_fusion(model, knn, b)), [k])[f"ndcg@{k}"] for b in FUSION_BETAS}
    return max(FUSION_BETAS, key=lambda b: (ndcg[b], -b)), ndcg
