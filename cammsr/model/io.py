"""Build CAMMSR from a split and its feature stores; save and load checkpoints.

Checkpoints hold only tensors and plain values (state_dict + config), so they load with
``torch.load(..., weights_only=True)``. The frozen features are not saved: they are read
again from the DVC-tracked stores, aligned to the split's item index.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cammsr.core.atomic import atomic_path
from cammsr.core.config import SplitParams, TrainParams
from cammsr.core.paths import CatalogPaths
from cammsr.data.splits import SplitData
from cammsr.model import CAMMSR, ModelConfig
from features.store import load_features

log = logging.getLogger(__name__)


def config_from_params(train: TrainParams, split: SplitData, split_params: SplitParams,
                       text_dim: int, image_dim: int) -> ModelConfig:
    """The model config for ``train`` (``train.model == "sasrec"`` applies the SASRec switches).

    The one place a `ModelConfig` is made from params; a checkpoint stores the result (`save_checkpoint`).
    """
    cfg = ModelConfig(
        num_items=split.num_items, num_categories=max(split.num_categories, 1), text_dim=text_dim,
        image_dim=image_dim, feature_norm=train.feature_norm, hidden_size=train.hidden_size,
        num_layers=train.num_layers, num_heads=train.num_heads, ffn_size=train.ffn_size, dropout=train.dropout,
        max_seq_len=split_params.max_seq_len, use_id=train.use_id, use_text=train.use_text,
        use_image=train.use_image, num_experts=train.num_experts, category_guidance=train.category_guidance,
        weight_mode=train.weight_mode, lambda_cat=train.lambda_cat, swap_cl=train.swap_cl,
        swap_prob=train.swap_prob, lambda_cl=train.lambda_cl, cl_temperature=train.cl_temperature,
        norm=train.norm, dyt_scope=train.dyt_scope, dyt_alpha_init=train.dyt_alpha_init,
        weight_temperature=train.weight_temperature, score_scale=train.score_scale,
        shared_encoder=train.shared_encoder, category_loss=train.category_loss,
        num_path_tokens=len(split.path_tokens or []), fast_dropout=train.fast_dropout,
    )
    return cfg.sasrec() if train.model == "sasrec" else cfg


def noisy_categories(item_category: np.ndarray, fraction: float, num_categories: int, seed: int,
                     item_paths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Relabel ``fraction`` of the items (row 0 = padding excluded) with a uniformly random category.

    The same items get the category path of a random item (``item_paths`` [N+1, D_p], for the multi-hot
    loss), so both category losses see the same noise. Returns the labels and the paths (copies).
    """
    out = item_category.copy()
    paths = item_paths.copy() if item_paths is not None else None
    if fraction <= 0 or num_categories < 2:
        return out, paths
    rng = np.random.default_rng(seed)
    items = np.arange(1, len(out))
    chosen = rng.choice(items, size=int(round(fraction * len(items))), replace=False)
    out[chosen] = rng.integers(0, num_categories, size=len(chosen))
    if paths is not None:
        paths[chosen] = item_paths[rng.choice(items, size=len(chosen))]
    return out, paths


def padded_features(path: Path, item_ids: list[str], norm: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N+1, D] and presence [N+1] aligned to item_idx (row 0 = padding, absent).

    ``norm="center_l2"`` subtracts the mean over present items and scales each row to unit length:
    frozen encoders differ by orders of magnitude in scale (MiniLM ~3, CLIP ~20) and share a large
    common direction, which otherwise lets one modality dominate the sum of scores at the start.
    """
    feats, present = load_features(path, item_ids)  # a missing store gives width 0, all absent
    if norm == "center_l2" and present.any() and feats.shape[1]:
        feats = feats - feats[present].mean(axis=0, keepdims=True)
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-8)
        feats[~present] = 0.0
    feats = np.concatenate([np.zeros((1, feats.shape[1]), np.float32), feats.astype(np.float32)])
    present = np.concatenate([[False], present])
    return torch.from_numpy(feats), torch.from_numpy(present)


def item_features(paths: CatalogPaths, item_ids: list[str], norm: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Text and image features [N+1, D_m] with presence [N+1], aligned to the split (see `padded_features`)."""
    return {"text": padded_features(paths.text_features, item_ids, norm),
            "image": padded_features(paths.image_features, item_ids, norm)}


def build_model(train: TrainParams, split_params: SplitParams, split: SplitData, paths: CatalogPaths,
                seed: int) -> CAMMSR:
    """A freshly initialised model for this split, with its frozen features attached."""
    feats = item_features(paths, split.item_ids, train.feature_norm)
    cfg = config_from_params(train, split, split_params, feats["text"][0].shape[1], feats["image"][0].shape[1])
    cats, item_path = noisy_categories(split.item_category, train.category_noise, split.num_categories, seed,
                                       split.item_paths)
    return CAMMSR(cfg, torch.from_numpy(cats), *feats["text"], *feats["image"],
                  item_path=torch.from_numpy(item_path) if item_path is not None else None)


def save_checkpoint(path: Path, model: CAMMSR, **extra: object) -> None:
    """Atomically save state_dict + config (+ plain extras such as epoch and metrics)."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "config": model.cfg.to_dict(), **extra}, tmp)


# Parameter names before the feature projections and missing vectors moved into dicts.
_RENAMED = {"text_proj.": "feature_proj.text.", "image_proj.": "feature_proj.image.",
            "text_missing": "missing.text", "image_missing": "missing.image"}


def _renamed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with the parameter names of older checkpoints mapped to today's."""
    out = {}
    for key, value in state_dict.items():
        old = next((o for o in _RENAMED if key.startswith(o)), None)
        out[_RENAMED[old] + key[len(old):] if old else key] = value
    return out


def load_checkpoint(path: Path, split: SplitData, paths: CatalogPaths, map_location: str | torch.device = "cpu"
                    ) -> tuple[CAMMSR, dict]:
    """Rebuild the model saved at ``path`` (weights_only=True) with features re-read from the stores,
    prepared as in training (the config's ``feature_norm``)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    config = dict(ckpt["config"])
    # Older checkpoints keep feature_norm beside the config; older still predate it (raw features).
    config.setdefault("feature_norm", ckpt.get("feature_norm", "none"))
    cfg = ModelConfig(**config)
    feats = item_features(paths, split.item_ids, cfg.feature_norm)
    widths = feats["text"][0].shape[1], feats["image"][0].shape[1]
    if (cfg.text_dim, cfg.image_dim) != widths:
        raise ValueError(f"{path}: trained with feature widths text={cfg.text_dim} image={cfg.image_dim}, "
                         f"stores now give text={widths[0]} image={widths[1]}: retrain")
    state = _renamed(ckpt["state_dict"])
    model = CAMMSR(cfg, state["item_category"], *feats["text"], *feats["image"], item_path=state.get("item_path"))
    model.load_state_dict(state)
    return model, ckpt
