"""Re-balancing losses as methods (spec baselines.md section 2): focal, class-balanced, Balanced Softmax / logit
adjustment, LDAM with deferred re-weighting, and mixup / CutMix around any of them. Each loss lives in
``longtail.losses`` (a pure function and a registered loss module); the method of the same name trains the model's
logits with it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longtail.losses import (  # noqa: F401  (re-exported: longtail.methods.losses named them first)
    class_balanced_weights,
    create_loss,
    focal_loss,
    ldam_margins,
    logit_adjusted_loss,
    posthoc_adjusted,
)
from longtail.losses.modules import (
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    PosthocLogitAdjustment,
)
from longtail.methods.base import BatchInfo, LossMethod, MethodContext, TrainsWithLoss, why_not_a_loss
from longtail.models import Classifier
from longtail.registry import LOSSES, METHODS


@METHODS.register("focal")
class Focal(LossMethod):
    """Focal loss, -(1 - p_y)^gamma log p_y (gamma = 2 as in TDE's and GLT's baselines)."""

    loss_name = "focal"
    Config = FocalLoss.Config


@METHODS.register("cb_loss")
class ClassBalanced(LossMethod):
    """Class-balanced loss by effective number (Cui et al., CVPR 2019): softmax CE or focal, or the sigmoid CE /
    focal of Cui et al.'s code (``loss: sigmoid | sigmoid_focal``).

    The sigmoid forms start the head's bias at -log(C - 1) when the stage starts and keep it out of weight decay,
    as that code does (``sigmoid_bias``); predictions are argmax z either way."""

    loss_name = "cb_loss"
    Config = ClassBalancedLoss.Config


@METHODS.register("logit_adjust")
class LogitAdjust(LossMethod):
    """Logit-adjusted loss (Menon et al., ICLR 2021): CE(z + tau log pi, y); predict argmax z."""

    loss_name = "logit_adjust"
    Config = LogitAdjustedLoss.Config


@METHODS.register("balanced_softmax")
class BalancedSoftmax(LossMethod):
    """Balanced Softmax (Ren et al., NeurIPS 2020): CE(z + log n, y), i.e. logit adjustment with tau = 1."""

    loss_name = "balanced_softmax"
    Config = BalancedSoftmaxLoss.Config


@METHODS.register("logit_adjust_posthoc")
class LogitAdjustPosthoc(LossMethod):
    """Post-hoc logit adjustment: train with CE, predict argmax z - tau log pi (tau sweepable at eval).

    ``tau: val`` chooses tau on the run's val split over ``tau_grid`` when the stage ends (best mean per-class
    accuracy), e.g. as a no-training stage 2 (``epochs: 0``) on a CE run's weights.
    """

    loss_name = "logit_adjust_posthoc"
    val_options = ("tau",)
    Config = PosthocLogitAdjustment.Config

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        return posthoc_adjusted(self.model.forward_head(feats), self.class_counts, self.option("tau"))


@METHODS.register("ldam_drw")
class LDAMDRW(LossMethod):
    """LDAM margins (Cao et al., NeurIPS 2019) on a cosine head, with deferred re-weighting from drw_epoch.

    z = s (cos - Delta_y on the true class), s = the cosine head's scale (model.head.scale, 30 in the paper).
    """

    loss_name = "ldam_drw"
    requires_head = LDAMLoss.requires_head
    Config = LDAMLoss.Config


@METHODS.register("mixup")
class Mixup(TrainsWithLoss):
    """Mixup (Zhang et al., ICLR 2018) around any registered loss: x~ = lam x + (1 - lam) x[j], lam ~ Beta(a, a),
    L = lam l(f(x~), y) + (1 - lam) l(f(x~), y[j]), with l the loss ``base`` at its defaults.

    ``cutmix: true``: CutMix (Yun et al., ICCV 2019) instead: a box of x[j] pasted into x, its sides sqrt(1 - lam)
    of the image's, centre uniform, clipped at the border (as torchvision transforms v2's CutMix), and lam then
    the share of x kept. Both work on whole batches, so on every data path."""

    @dataclass
    class Config:
        alpha: float = 1.0
        base: str = "ce"  # a registered loss, at its defaults (longtail.losses: ce, focal, cb_loss, ldam_drw, ...)
        cutmix: bool = False  # paste a box of the other image (CutMix) instead of blending the whole image

        def __post_init__(self) -> None:
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            if self.base == "mixup" or (self.base not in METHODS and self.base not in LOSSES):
                raise ValueError(f"base must be a registered loss other than mixup ({', '.join(LOSSES)}), got "
                                 f"'{self.base}'")
            if self.base == "ifl":  # mixup calls only the base's loss: no environments, no centres
                raise ValueError("mixup cannot wrap ifl: it would silently train plain mixup (IFL's environments "
                                 "and centres live in its training step); for Mixup + IFL use method ifl with "
                                 "mixup_alpha: 1.0")
            reason = why_not_a_loss(self.base)
            if reason:
                raise ValueError(f"base {reason}; mixup mixes a registered loss ({', '.join(LOSSES)})")

    @classmethod
    def head_needed(cls, opts: dict) -> str | None:
        base = opts.get("base", cls.Config.base)
        return LOSSES.get(base).requires_head if base in LOSSES else None

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        # The base's loss at its defaults: a submodule that saves nothing (its constants are non-persistent).
        self.criterion = create_loss(cfg.base, None, ctx.train_counts, model, f"method.base ({cfg.base})")

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                batch: BatchInfo | None = None) -> dict[str, torch.Tensor]:
        if not self.training:
            return super().forward(images, targets, batch)
        lam = float(torch.distributions.Beta(self.cfg.alpha, self.cfg.alpha).sample())
        perm = torch.randperm(len(images), device=images.device)
        if self.cfg.cutmix:
            images, lam = _cut_and_paste(images, perm, lam)
            logits = self.model(images)
        else:
            logits = self.model(lam * images + (1 - lam) * images[perm])
        loss = lam * self.criterion(logits, targets) + (1 - lam) * self.criterion(logits, targets[perm])
        return {"loss": loss, "logits": logits}

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.criterion.adjust_scores(self.model.forward_head(feats))  # the base's, e.g. post-hoc LA's z - log pi


def _cut_and_paste(images: torch.Tensor, perm: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """CutMix's box: images (B, C, H, W) with a box of images[perm] of area ~(1 - lam) pasted in; returns them and
    the share of each image kept (the box clipped at the border is smaller). The centre is drawn from the global
    generator, like lam."""
    h, w = images.shape[-2:]
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    rh, rw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
    x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
    return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
