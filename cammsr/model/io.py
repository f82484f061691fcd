"""Build CAMMSR from a split and its feature stores; save and load checkpoints.

Checkpoints hold only tensors and plain values (state_dict + config), so they load with
``torch.load(..., weights_only=True)``. The frozen features are not saved: they are read
again from the DVC-tracked stores, aligned to the split's item index. Training and evaluation read
the stores cut to the split (``split_features/``); serving reads the whole stores, which may hold items
added after training: `load_checkpoint` grows the item table for them (unknown-ID vector + content).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
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
        score_refined=train.score_refined, feature_init=train.feature_init,
        modality_dropout=train.modality_dropout, content_table=train.content_table,
        shared_encoder=train.shared_encoder, category_loss=train.category_loss,
        num_path_tokens=len(split.path_tokens or []),
        id_dropout=train.id_dropout, fast_dropout=train.fast_dropout,
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


def item_ids_sha256(item_ids: Sequence[str]) -> str:
    """A fingerprint of an item index (ids in index order): a checkpoint keeps the one it was trained on."""
    return hashlib.sha256("\n".join(item_ids).encode("utf-8")).hexdigest()


def padded_features(path: Path, item_ids: list[str], norm: str = "none", center_rows: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N+1, D] and presence [N+1] aligned to item_idx (row 0 = padding, absent).

    ``norm="center_l2"`` subtracts the mean over present items and scales each row to unit length:
    frozen encoders differ by orders of magnitude in scale (MiniLM ~3, CLIP ~20) and share a large
    common direction, which otherwise lets one modality dominate the sum of scores at the start.
    With ``center_rows`` the mean is over the present items among the first ``center_rows`` only (the
    items a model was trained on), so items appended after them do not move the trained items' features.
    """
    feats, present = load_features(path, item_ids)  # a missing store gives width 0, all absent
    if norm == "center_l2" and present.any() and feats.shape[1]:
        basis = present.copy()
        if center_rows is not None:
            basis[center_rows:] = False
        if basis.any():
            feats = feats - feats[basis].mean(axis=0, keepdims=True)
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-8)
        feats[~present] = 0.0
    feats = np.concatenate([np.zeros((1, feats.shape[1]), np.float32), feats.astype(np.float32)])
    present = np.concatenate([[False], present])
    return torch.from_numpy(feats), torch.from_numpy(present)


def split_stores(paths: CatalogPaths) -> dict[str, Path]:
    """The feature stores cut to the split (the split_features stage): what train and evaluate read."""
    return {m: paths.split_features(m) for m in ("text", "image")}


def whole_stores(paths: CatalogPaths) -> dict[str, Path]:
    """The whole feature stores, every catalog item: what serving reads (items added after training)."""
    return {m: paths.feature_store(m) for m in ("text", "image")}


def item_features(stores: Mapping[str, Path], item_ids: list[str], norm: str, center_rows: int | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Text and image features [N+1, D_m] with presence [N+1], aligned to ``item_ids`` (see `padded_features`)."""
    return {m: padded_features(stores[m], item_ids, norm, center_rows) for m in ("text", "image")}


def build_model(train: TrainParams, split_params: SplitParams, split: SplitData, paths: CatalogPaths,
                seed: int) -> CAMMSR:
    """A freshly initialised model for this split, with its frozen features attached (`split_stores`)."""
    feats = item_features(split_stores(paths), split.item_ids, train.feature_norm)
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


def _check_trained_items(path: Path, ckpt: dict, split: SplitData, trained: int) -> None:
    """The split's first ``trained`` items are the ones the checkpoint was trained on, in the same order."""
    if split.num_items < trained:
        raise ValueError(f"{path}: trained on {trained} items, the split lists {split.num_items}: "
                         f"the split changed since training; retrain (dvc repro train)")
    expected = ckpt.get("item_ids_sha256")
    if expected is None:  # checkpoints before the fingerprint: only the item count can be checked
        if split.num_items != trained:
            raise ValueError(f"{path}: predates the item-index fingerprint, so it cannot serve items added "
                             f"after training ({split.num_items - trained} given); retrain")
        return
    if item_ids_sha256(split.item_ids[:trained]) != expected:
        raise ValueError(f"{path}: trained on another item index than the split's first {trained} items "
                         f"(the split changed since training); retrain (dvc repro train)")


def grow_state(state: dict[str, torch.Tensor], item_category: np.ndarray, item_paths: np.ndarray | None = None,
               num_path_tokens: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict of a model trained on W items, grown to the N >= W items of ``item_category`` [N+1].

    New ID rows are zeros (the model replaces them with the unknown-ID vector, `CAMMSR.mark_unknown_ids`);
    new items take their categories from ``item_category`` (and category path tokens from ``item_paths``
    [N+1, D_p], for a model trained with the multi-hot category loss over ``num_path_tokens`` tokens; a token
    the model never saw is dropped), trained ones keep the checkpoint's
    (they may carry the training run's category noise). Every other tensor is independent of the item count.
    """
    out = dict(state)
    trained = len(state["item_category"])  # W+1
    new_cats = torch.from_numpy(np.asarray(item_category[trained:], dtype=np.int64))
    out["item_category"] = torch.cat([state["item_category"], new_cats.to(state["item_category"].device)])
    if "id_emb.weight" in state:
        emb = state["id_emb.weight"]  # [W+1, d]
        out["id_emb.weight"] = torch.cat([emb, emb.new_zeros(len(new_cats), emb.shape[1])])  # [N+1, d]
    if "item_path" in state:
        old = state["item_path"]  # [W+1, D_p]
        if item_paths is None:
            raise ValueError("the checkpoint has category path tokens, the split has none: rerun the split")
        new = torch.full((len(new_cats), old.shape[1]), -1, dtype=old.dtype)
        tail = torch.from_numpy(np.asarray(item_paths[trained:], dtype=np.int64))[:, : old.shape[1]]
        new[:, : tail.shape[1]] = tail.masked_fill(tail >= num_path_tokens, -1)
        out["item_path"] = torch.cat([old, new.to(old.device)])  # [N+1, D_p]
    return out


def load_checkpoint(path: Path, split: SplitData, paths: CatalogPaths, map_location: str | torch.device = "cpu",
                    stores: Mapping[str, Path] | None = None) -> tuple[CAMMSR, dict]:
    """Rebuild the model saved at ``path`` (weights_only=True) with features re-read from the stores,
    prepared as in training (the config's ``feature_norm``).

    ``split`` may list more items than the model was trained on, after the trained ones (items added to the
    catalog since, or held out of training): the item table grows to hold them, and they are scored with the
    learned unknown-ID vector in place of an ID row (`cammsr.model.content_neighbours.impute_new_item_ids` can then give
    them ID rows from their content neighbours) and their own text and image through the trained
    projections and experts. ``stores``: where the features come from; default the split's cut
    (`split_stores`), which holds only the split's items; items added after training need `whole_stores`.

    Raises:
        ValueError: the split's first items are not the ones the model was trained on, or the stores'
            feature widths are not the trained ones.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    config = dict(ckpt["config"])
    # Older checkpoints keep feature_norm beside the config; older still predate it (raw features).
    config.setdefault("feature_norm", ckpt.get("feature_norm", "none"))
    trained_cfg = ModelConfig(**config)
    trained = trained_cfg.num_items
    _check_trained_items(path, ckpt, split, trained)
    cfg = replace(trained_cfg, num_items=split.num_items)
    feats = item_features(stores or split_stores(paths), split.item_ids, cfg.feature_norm, center_rows=trained)
    widths = feats["text"][0].shape[1], feats["image"][0].shape[1]
    if (cfg.text_dim, cfg.image_dim) != widths:
        raise ValueError(f"{path}: trained with feature widths text={cfg.text_dim} image={cfg.image_dim}, "
                         f"stores now give text={widths[0]} image={widths[1]}: retrain")
    state = _renamed(ckpt["state_dict"])
    if "id" in cfg.modalities and "missing.id" not in state:  # before the unknown-ID vector: untrained, zeros
        state["missing.id"] = torch.zeros(cfg.hidden_size)
    if split.num_items > trained:
        state = grow_state(state, split.item_category, split.item_paths, cfg.num_path_tokens)
    model = CAMMSR(cfg, state["item_category"], *feats["text"], *feats["image"], item_path=state.get("item_path"))
    model.load_state_dict(state)
    model.mark_unknown_ids(torch.arange(split.num_items + 1) > trained)
    return model, ckpt
