"""Decoupled two-stage training (Kang et al., ICLR 2020; spec baselines.md section 5): stage-2 methods that
re-balance only the classifier on top of a frozen stage-1 backbone (``init_from`` the stage-1 stage).

Frozen means ``requires_grad=False``. By default BatchNorm stays in eval mode too (the cleaner choice; the GLT code
left BN training: defect G8). cRT and LWS offer ``backbone_bn: train``, what Decoupling's own code does
(``run_networks.py``: every epoch calls ``model.train()`` on all networks, the ``fix: true`` feature model included,
so its BN normalises with batch statistics and its running statistics follow the class-balanced batches; spec
baselines.md 5, audit 2026-12-01). Evaluation and feature extraction always use eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.dist import broadcast_from_main
from longtail.methods.base import BatchInfo, FeatureSet, FitControl, Method, MethodContext, ParamGroup, check_val_option
from longtail.methods.losses import logit_adjusted_loss
from longtail.models import Classifier
from longtail.models.heads import LinearHead
from longtail.registry import METHODS


def _check_backbone_bn(value: str) -> None:
    if value not in ("eval", "train"):
        raise ValueError(f"backbone_bn must be eval or train, got '{value}'")


class _FrozenBackbone(Method):
    """Base of the stage-2 methods: the backbone's weights are frozen; it stays in eval mode unless the method's
    ``backbone_bn`` (cRT, LWS) is ``train``."""

    requires_head = "linear"
    stage_two = True

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        for p in model.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenBackbone:
        super().train(mode)
        # eval: frozen BN statistics, also while the classifier trains. train (Decoupling's code): while training,
        # BN normalises each batch by its own statistics and updates its running ones (saved with the weights);
        # eval() still switches everything to eval mode for evaluation.
        if getattr(self.cfg, "backbone_bn", "eval") == "eval":
            self.model.backbone.eval()
        return self


@METHODS.register("crt")
class ClassifierRetraining(_FrozenBackbone):
    """cRT: re-initialise the linear classifier (with bias) and re-train it with CE, backbone frozen.

    ``loss: balanced_softmax`` re-trains it with Balanced Softmax instead (Ren et al. 2020; CE(z + log pi, y),
    predict argmax z), usually with the instance sampler: a Balanced-Softmax classifier on frozen features.
    """

    @dataclass
    class Config:
        loss: str = "ce"  # ce (Decoupling's cRT) | balanced_softmax
        backbone_bn: str = "eval"  # eval: frozen BN statistics | train: BN in train mode, as Decoupling's code

        def __post_init__(self) -> None:
            if self.loss not in ("ce", "balanced_softmax"):
                raise ValueError(f"loss must be ce or balanced_softmax, got '{self.loss}'")
            _check_backbone_bn(self.backbone_bn)

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        # A fresh classifier, in __init__ so that a reloaded cRT model has the same architecture.
        head = LinearHead(model.feature_dim, ctx.num_classes, bias=True)
        model.reset_classifier(head.to(next(model.backbone.parameters()).device))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "balanced_softmax":
            return logit_adjusted_loss(logits, targets, self.class_counts, 1.0)
        return F.cross_entropy(logits, targets)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup(list(self.model.head.parameters()))]


@METHODS.register("lws")
class LearnableWeightScaling(_FrozenBackbone):
    """LWS: keep the stage-1 classifier (W, b) frozen and learn one scale per class, z_c = s_c (w_c x + b_c)."""

    @dataclass
    class Config:
        backbone_bn: str = "eval"  # eval: frozen BN statistics | train: BN in train mode, as Decoupling's code

        def __post_init__(self) -> None:
            _check_backbone_bn(self.backbone_bn)

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        for p in model.head.parameters():
            p.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(ctx.num_classes))  # (C,) s_c, initialised to 1

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                batch: BatchInfo | None = None) -> dict[str, torch.Tensor]:
        logits = self.scales * self.model(images)
        return {"loss": F.cross_entropy(logits, targets), "logits": logits}

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup([self.scales])]

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scales * self.model.forward_head(feats)


def tau_grid() -> list[float]:
    """0, 0.1, ..., 2.0: the tau values Decoupling's ``tau_norm.py`` evaluates (``np.linspace(0, 2, 21)``)."""
    return [round(0.1 * i, 10) for i in range(21)]


@METHODS.register("tau_norm")
class TauNormalization(_FrozenBackbone):
    """tau-normalisation: no training; w_c / ||w_c||^tau, bias dropped (tau sweepable at eval, choose on val).

    ``tau: val`` chooses tau when the stage ends: the best mean per-class accuracy on the run's val split over
    ``tau_grid`` (features in eval mode, computed once), as Decoupling picks tau from the curve ``tau_norm.py``
    prints for the val features (its "All" column is the mean of per-class accuracies). The curve and the choice
    are written to metrics.json (``chosen_on_val``) and the log.
    """

    val_options = ("tau",)

    trains = False  # post-hoc: a stage of epochs 0

    @dataclass
    class Config:
        tau: float | str = 1.0  # a number, or "val": chosen on the val split over tau_grid at the stage end
        tau_grid: list[float] = field(default_factory=tau_grid)

        def __post_init__(self) -> None:
            check_val_option("tau", self.tau, self.tau_grid)

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        w = self.model.head.weight  # (C, D)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12) ** self.option("tau")
        return feats @ w.T


@METHODS.register("ncm")
class NearestClassMean(_FrozenBackbone):
    """NCM: nearest class centroid of the stage-1 training features, 'cl2n' transform (subtract the mean
    training feature, L2-normalise) and Euclidean distance, as the reference KNNClassifier defaults."""

    trains = False  # post-hoc: a stage of epochs 0; the centroids are fitted at its start, on the train features

    @dataclass
    class Config:
        pass

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        self.register_buffer("feature_mean", torch.zeros(model.feature_dim))  # (D,)
        self.register_buffer("centroids", torch.zeros(ctx.num_classes, model.feature_dim))  # (C, D)

    def _cl2n(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats - self.feature_mean, dim=1, eps=1e-12)

    def feature_splits(self, ctx: MethodContext) -> tuple[str, ...]:
        return ("train",)

    def fit_features(self, feats: FeatureSet, ctx: MethodContext, fit: FitControl) -> None:
        x, labels = feats["train"]  # (N, D), (N,); no epochs, so nothing to tell ``fit``
        self.feature_mean.copy_(x.mean(0))
        z = self._cl2n(x)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=self.num_classes).clamp_min(1)[:, None]
        self.centroids.copy_(sums / counts)
        broadcast_from_main(self.feature_mean, self.centroids)  # DDP: kernels may differ by rank; keep rank 0's

    def param_groups(self) -> list[ParamGroup]:
        return []

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(self._cl2n(feats.float()), self.centroids)  # (B, C): higher is nearer
