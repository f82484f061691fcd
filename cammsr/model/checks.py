"""Input checks of CAMMSR, with errors that say what was expected and what was found.

Tensors handed to the model at construction are checked whole. A batch is checked by shape and dtype
only, except on the CPU: reading a value of a GPU tensor would cost a device sync every step.
"""

from __future__ import annotations

import torch


def describe(x: object) -> str:
    """``torch.int32 tensor of shape (2, 3)``, or the type name of a non-tensor."""
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_table(name: str, x: object, rows: int) -> None:
    """``x`` is a tensor with one row per item, padding included (``rows`` = N+1)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor with {rows} rows (N+1), found {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows (num_items + 1, row 0 = padding), "
                         f"found shape {tuple(x.shape)}")


def check_features(m: str, features: object, present: object, dim: int, rows: int) -> None:
    """The frozen features [N+1, dim] and presence [N+1] of the active modality ``m``."""
    if features is None or present is None:
        raise ValueError(f"{m} is active (use_{m} and {m}_dim={dim}) but {m}_features or {m}_present "
                         f"was not given")
    check_table(f"{m}_features", features, rows)
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"{m}_features: expected shape ({rows}, {dim}) ({m}_dim of the config), "
                         f"found {tuple(features.shape)}")
    check_table(f"{m}_present", present, rows)
    if present.ndim != 1:
        raise ValueError(f"{m}_present: expected shape ({rows},), found {tuple(present.shape)}")


def check_seq(seq: object, max_seq_len: int) -> None:
    """``seq`` is a LongTensor [B, L] with L <= max_seq_len (the position table's size)."""
    if not isinstance(seq, torch.Tensor) or seq.dtype != torch.long:
        raise TypeError(f"seq: expected a LongTensor [B, L] of item indices, found {describe(seq)}")
    if seq.ndim != 2:
        raise ValueError(f"seq: expected 2 dimensions [B, L], found shape {tuple(seq.shape)}")
    if seq.shape[1] > max_seq_len:
        raise ValueError(f"seq: {seq.shape[1]} positions, longer than max_seq_len {max_seq_len} "
                         f"(the position table's size)")


def check_items(items: torch.Tensor, num_items: int) -> None:
    """The sorted unique indices of a batch (LongTensor [U]) are in 0..N; checked on the CPU only."""
    if items.device.type == "cpu" and len(items) and (items[0] < 0 or items[-1] > num_items):
        raise ValueError(f"seq: item indices must be in 0..{num_items}, found {int(items[0])}..{int(items[-1])}")


def check_targets(targets: object, seq: torch.Tensor) -> None:
    """``targets`` is a LongTensor of ``seq``'s shape [B, L]."""
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long:
        raise TypeError(f"targets: expected a LongTensor [B, L], found {describe(targets)}")
    if targets.shape != seq.shape:
        raise ValueError(f"targets: expected the shape of seq {tuple(seq.shape)}, found {tuple(targets.shape)}")


def check_lengths(lengths: object, seq: torch.Tensor) -> None:
    """``lengths`` is a LongTensor [B], one per sequence of ``seq`` [B, L], in 1..L (values: CPU only)."""
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.long:
        raise TypeError(f"lengths: expected a LongTensor [B], found {describe(lengths)}")
    if lengths.shape != seq.shape[:1]:
        raise ValueError(f"lengths: expected shape ({seq.shape[0]},), one per sequence of seq "
                         f"{tuple(seq.shape)}, found {tuple(lengths.shape)}")
    if lengths.device.type == "cpu" and len(lengths) and (lengths.min() < 1 or lengths.max() > seq.shape[1]):
        raise ValueError(f"lengths: expected values in 1..{seq.shape[1]} (the width of seq), "
                         f"found {int(lengths.min())}..{int(lengths.max())}")
