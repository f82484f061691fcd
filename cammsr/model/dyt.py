"""Dynamic Tanh (Zhu et al., CVPR 2025): a drop-in replacement for LayerNorm."""

from __future__ import annotations

import torch
from torch import nn


class DyT(nn.Module):
    """DyT(x) = gamma * tanh(alpha * x) + beta, alpha a learnable scalar.

    Args:
        dim: channel width (gamma and beta are per channel).
        alpha_init: initial alpha; 0.5 is the DyT paper's default for models of this width.
    """

    def __init__(self, dim: int, alpha_init: float = 0.5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        return self.gamma * torch.tanh(self.alpha * x) + self.beta


def make_norm(kind: str, dim: int, alpha_init: float = 0.5, eps: float = 1e-12) -> nn.Module:
    """``"dyt"`` -> DyT, ``"layernorm"`` -> LayerNorm (eps as in RecBole's SASRec)."""
    if kind == "dyt":
        return DyT(dim, alpha_init)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}: expected 'dyt' or 'layernorm'")
