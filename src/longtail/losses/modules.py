"""The registered losses (``LOSSES``): each a small module of a loss function and the per-class constants it needs.

A loss is what a method trains the logits with. The methods of the same names (``method: {name: focal}``) train the
model with it; IFL and mixup take theirs by name (``base: focal``) and hold it as a submodule. Its constants (priors,
margins, class weights) are non-persistent buffers: they follow the method's device and are never saved, so a
method's checkpoint keys do not depend on its loss.

The loss contract: ``Config`` (its options, a strict dataclass), ``requires_head`` (a head it needs),
``__init__(cfg, counts, model)`` ((C,) training images per class; the model, to read, never to keep),
``forward(logits, targets)`` (a scalar), ``on_epoch_start(epoch)`` (a per-epoch schedule: deferred re-weighting),
``adjust_scores(scores)`` (the prediction-time correction that goes with the loss; default none), and two hooks on the
model the loss trains, which every method holding a loss calls (its own, IFL's or mixup's base):
``on_stage_start(model, num_classes)`` (e.g. cb_loss's sigmoid forms start the head's bias) and ``no_decay(model)``
(its parameters the loss keeps out of weight decay; default none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.config import ConfigError, check_val_option, from_dict
from longtail.losses.functional import (
    class_balanced_weights,
    focal_loss,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    posthoc_adjusted,
    sigmoid_focal_loss,
)
from longtail.registry import LOSSES

if TYPE_CHECKING:
    from longtail.models import Classifier


class Loss(nn.Module):
    """Base loss: plain cross-entropy. Subclasses override what differs."""

    requires_head: str | None = None  # a registered head the loss needs (LDAM's margins: cosine)

    @dataclass
    class Config:
        """The loss's own options (strict: unknown keys are config errors)."""

    def __init__(self, cfg: Any, counts: torch.Tensor, model: Classifier | None = None) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, C) logits and (B,) targets -> the scalar loss."""
        return F.cross_entropy(logits, targets)

    def on_epoch_start(self, epoch: int) -> None:
        """Per-epoch schedules (0-based ``epoch`` of the stage), e.g. deferred re-weighting."""

    def adjust_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, C) prediction scores -> the scores this loss predicts with; default: unchanged."""
        return scores

    def on_stage_start(self, model: Classifier, num_classes: int) -> None:
        """When the stage starts: after ``init_from``'s weights, before a resumed stage's state loads (which then
        overwrites what this sets); default nothing."""

    def no_decay(self, model: Classifier) -> list[nn.Parameter]:
        """The model's parameters this loss trains without weight decay; default none."""
        return []


def create_loss(name: str, options: dict | None, counts: torch.Tensor, model: Classifier | None = None,
                where: str = "loss") -> Loss:
    """The registered loss ``name`` with ``options`` (checked against its Config; None: its defaults)."""
    cls = LOSSES.get(name)
    return cls(from_dict(cls.Config, options or {}, where), counts, model)


@LOSSES.register("ce")
class CrossEntropyLoss(Loss):
    """Cross-entropy, L = -log softmax(z)_y (optionally label-smoothed)."""

    @dataclass
    class Config:
        label_smoothing: float = 0.0  # 0: plain CE (every reference recipe)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)


@LOSSES.register("focal")
class FocalLoss(Loss):
    """Focal loss, -(1 - p_y)^gamma log p_y (gamma = 2 as in TDE's and GLT's baselines)."""

    @dataclass
    class Config:
        gamma: float = 2.0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.cfg.gamma)


SIGMOID_FORMS = ("sigmoid", "sigmoid_focal")  # cb_loss's one-vs-all forms (Cui et al.'s code)


@LOSSES.register("cb_loss")
class ClassBalancedLoss(Loss):
    """Class-balanced loss by effective number (Cui et al., CVPR 2019), with softmax CE, softmax focal, or the
    sigmoid (one-vs-all) CE / focal of Cui et al.'s own code (``sigmoid``, ``sigmoid_focal``)."""

    @dataclass
    class Config:
        beta: float = 0.9999
        loss: str = "softmax"  # softmax | focal | sigmoid | sigmoid_focal
        gamma: float = 2.0  # focal and sigmoid_focal
        reduction: str = "weighted_mean"  # weighted_mean (LDAM-DRW / RIDE code) | mean (Cui et al.'s sigmoid forms)
        # The sigmoid forms, as Cui et al.'s code: the head's bias starts at -log(C - 1) (every class at probability
        # 1/C) when the stage starts, and takes no weight decay. False: the bias as it is, decayed like the rest.
        sigmoid_bias: bool = True

        def __post_init__(self) -> None:
            if self.loss not in ("softmax", "focal", *SIGMOID_FORMS):
                raise ValueError(f"loss must be softmax, focal, sigmoid or sigmoid_focal, got '{self.loss}'")
            if self.reduction not in ("weighted_mean", "mean"):
                raise ValueError(f"reduction must be weighted_mean or mean, got '{self.reduction}'")
            if not 0 <= self.beta < 1:
                raise ValueError(f"beta must be in [0, 1), got {self.beta}")

    def __init__(self, cfg: Any, counts: torch.Tensor, model: Classifier | None = None) -> None:
        super().__init__(cfg, counts, model)
        self.register_buffer("weights", class_balanced_weights(counts, cfg.beta), persistent=False)  # (C,)
        self.sigmoid_bias = cfg.loss in SIGMOID_FORMS and cfg.sigmoid_bias
        if self.sigmoid_bias and model is not None and _head_bias(model) is None:
            raise ConfigError(f"cb_loss loss={cfg.loss} starts the head's bias at -log(C - 1): use "
                              f"model.head=linear with bias: true, or set the loss's sigmoid_bias: false")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gamma = self.cfg.gamma if self.cfg.loss in ("focal", "sigmoid_focal") else 0.0
        if self.cfg.loss in SIGMOID_FORMS:
            return sigmoid_focal_loss(logits, targets, gamma, self.weights, self.cfg.reduction)
        return focal_loss(logits, targets, gamma, self.weights, self.cfg.reduction)

    def on_stage_start(self, model: Classifier, num_classes: int) -> None:
        if self.sigmoid_bias:  # sigmoid(-log(C - 1)) = 1 / C: every class starts at the uniform prior
            with torch.no_grad():
                _head_bias(model).fill_(-math.log(num_classes - 1))

    def no_decay(self, model: Classifier) -> list[nn.Parameter]:
        return [_head_bias(model)] if self.sigmoid_bias else []


def _head_bias(model: Classifier) -> nn.Parameter | None:
    return getattr(getattr(model.head, "fc", None), "bias", None)  # (C,) a linear head's


class _PriorLoss(Loss):
    """A loss that reads the class prior: the (C,) float training counts as the buffer ``counts``."""

    def __init__(self, cfg: Any, counts: torch.Tensor, model: Classifier | None = None) -> None:
        super().__init__(cfg, counts, model)
        self.register_buffer("counts", counts.clone().float(), persistent=False)  # (C,)


@LOSSES.register("logit_adjust")
class LogitAdjustedLoss(_PriorLoss):
    """Logit-adjusted loss (Menon et al., ICLR 2021): CE(z + tau log pi, y); predict argmax z."""

    @dataclass
    class Config:
        tau: float = 1.0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, targets, self.counts, self.cfg.tau)


@LOSSES.register("balanced_softmax")
class BalancedSoftmaxLoss(_PriorLoss):
    """Balanced Softmax (Ren et al., NeurIPS 2020): CE(z + log n, y), i.e. logit adjustment with tau = 1."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, targets, self.counts, 1.0)


@LOSSES.register("logit_adjust_posthoc")
class PosthocLogitAdjustment(_PriorLoss):
    """Post-hoc logit adjustment: train with CE, predict argmax z - tau log pi (tau sweepable at eval)."""

    @dataclass
    class Config:
        tau: float | str = 1.0  # prediction-time: longtail eval RUN --sweep method.tau=0:2:0.25; "val": chosen on val
        tau_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 10) for i in range(21)])  # 0..2

        def __post_init__(self) -> None:
            check_val_option("tau", self.tau, self.tau_grid)

    def adjust_scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.cfg.tau == "val":  # the method logit_adjust_posthoc chooses it; a loss inside a wrapper cannot
            raise ValueError("logit_adjust_posthoc: tau=val is chosen by the method of that name, give a number")
        return posthoc_adjusted(scores, self.counts, float(self.cfg.tau))


@LOSSES.register("ldam_drw")
class LDAMLoss(Loss):
    """LDAM margins (Cao et al., NeurIPS 2019) on a cosine head, with deferred re-weighting from drw_epoch.

    z = s (cos - Delta_y on the true class), s = the cosine head's scale (model.head.scale, 30 in the paper).
    """

    requires_head = "cosine"

    @dataclass
    class Config:
        max_margin: float = 0.5
        drw_epoch: int = 160  # 0-based epoch from which class-balanced weights apply (-1: never)
        beta: float = 0.9999

    def __init__(self, cfg: Any, counts: torch.Tensor, model: Classifier | None = None) -> None:
        super().__init__(cfg, counts, model)
        if model is None or not hasattr(model.head, "scale"):
            raise ValueError("ldam_drw needs the model's cosine head (model.head=cosine): its margins scale with s")
        self.scale = model.head.scale  # s, a number of the head (not a parameter)
        self.register_buffer("margins", ldam_margins(counts, cfg.max_margin), persistent=False)  # (C,)
        self.register_buffer("drw_weights", class_balanced_weights(counts, cfg.beta), persistent=False)  # (C,)
        self.reweight = False

    def on_epoch_start(self, epoch: int) -> None:
        self.reweight = 0 <= self.cfg.drw_epoch <= epoch

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ldam_loss(logits, targets, self.margins, self.scale, self.drw_weights if self.reweight else None)
