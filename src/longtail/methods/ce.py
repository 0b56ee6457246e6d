"""Cross-entropy: the baseline every long-tailed method is compared against."""

from __future__ import annotations

from longtail.losses.modules import CrossEntropyLoss
from longtail.methods.base import LossMethod
from longtail.registry import METHODS


@METHODS.register("ce")
class CrossEntropy(LossMethod):
    """Cross-entropy, L = -log softmax(z)_y (optionally label-smoothed)."""

    loss_name = "ce"
    Config = CrossEntropyLoss.Config
