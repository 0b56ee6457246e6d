"""Losses: pure loss functions (``functional``) and the registered loss modules (``modules``, ``LOSSES``).

Below the methods (they train with these), above the leaf modules; no method, engine or data code in here.
"""

from __future__ import annotations

from longtail.losses.functional import (
    class_balanced_weights,
    focal_loss,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    posthoc_adjusted,
    sigmoid_focal_loss,
)
from longtail.losses.modules import Loss, create_loss

__all__ = [
    "Loss",
    "class_balanced_weights",
    "create_loss",
    "focal_loss",
    "ldam_loss",
    "ldam_margins",
    "logit_adjusted_loss",
    "posthoc_adjusted",
    "sigmoid_focal_loss",
]
