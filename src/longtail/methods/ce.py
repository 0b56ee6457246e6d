"""Cross-entropy: the baseline every long-tailed method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longtail.methods.base import Method
from longtail.registry import METHODS


@METHODS.register("ce")
class CrossEntropy(Method):
    """Cross-entropy, L = -log softmax(z)_y (optionally label-smoothed)."""

    @dataclass
    class Config:
        label_smoothing: float = 0.0  # 0: plain CE (every reference recipe)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)
