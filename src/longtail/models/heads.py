"""Classifier heads: ``(B, D) features -> (B, C) logits``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.config import ModelConfig
from longtail.registry import HEADS


class LinearHead(nn.Module):
    """z = W x (+ b). TDE's and GLT's CE baseline is bias-free; Decoupling's joint model has a bias."""

    def __init__(self, in_dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.fc.weight  # (C, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class CosineHead(nn.Module):
    """z_c = s * cos(x, w_c): unit features against unit class weights, no bias."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))  # (C, D)
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eps inside normalize: a zero feature gives zero logits, never NaN.
        return self.scale * F.normalize(x, dim=1, eps=1e-12) @ F.normalize(self.weight, dim=1, eps=1e-12).T


@HEADS.register("linear")
def linear(in_dim: int, num_classes: int, cfg: ModelConfig) -> nn.Module:
    """Linear classifier (bias per model.head_bias)."""
    return LinearHead(in_dim, num_classes, bias=cfg.head_bias)


@HEADS.register("cosine")
def cosine(in_dim: int, num_classes: int, cfg: ModelConfig) -> nn.Module:
    """Cosine classifier with scale model.head_scale."""
    return CosineHead(in_dim, num_classes, scale=cfg.head_scale)
