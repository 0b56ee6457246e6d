"""Re-balancing losses (spec baselines.md section 2): focal, class-balanced, Balanced Softmax / logit
adjustment, LDAM with deferred re-weighting. Each is a pure function plus a Method plugin."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from longtail.methods.base import Method, MethodContext, check_val_option, why_not_a_loss
from longtail.models import Classifier
from longtail.registry import METHODS

# ----------------------------------------------------------------------------- pure functions


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017): -(1 - p_y)^gamma log p_y, optionally class-weighted (w_y).

    reduction: mean (plain mean over the batch) or weighted_mean (sum w_y l / sum w_y, PyTorch's convention).
    """
    logp = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)  # (B,)
    loss = -((1 - logp.exp()) ** gamma) * logp
    return _reduce(loss, targets, weight, reduction)


def _reduce(loss: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weight is None:
        return loss.mean()
    w = weight[targets]  # (B,)
    if reduction == "weighted_mean":
        return (w * loss).sum() / w.sum()
    return (w * loss).mean()


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. 2019: w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to C. beta = 0 gives all ones."""
    counts = counts.double()
    eff = 1.0 - torch.pow(torch.full_like(counts, beta), counts)  # (1 - beta^n) ; effective number * (1 - beta)
    w = (1.0 - beta) / eff.clamp_min(1e-12)
    return (w * len(counts) / w.sum()).float()


def logit_adjusted_loss(logits: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor,
                        tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted CE (Menon et al. 2021), CE(z + tau log pi, y); tau = 1 is Balanced Softmax (Ren et al.).

    pi = counts / sum(counts), with pi^tau + 1e-12 inside the log as in the LA code.
    """
    prior = counts.float() / counts.float().sum()
    return F.cross_entropy(logits + torch.log(prior**tau + 1e-12), targets)


def ldam_margins(counts: torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM (Cao et al. 2019): Delta_c = K / n_c^(1/4), K chosen so that the largest margin is max_margin."""
    m = 1.0 / counts.float().clamp_min(1) ** 0.25
    return m * (max_margin / m.max())


# ----------------------------------------------------------------------------- methods


@METHODS.register("focal")
class Focal(Method):
    """Focal loss, -(1 - p_y)^gamma log p_y (gamma = 2 as in TDE's and GLT's baselines)."""

    @dataclass
    class Config:
        gamma: float = 2.0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.cfg.gamma)


@METHODS.register("cb_loss")
class ClassBalanced(Method):
    """Class-balanced loss by effective number (Cui et al., CVPR 2019), with softmax CE or focal."""

    @dataclass
    class Config:
        beta: float = 0.9999
        loss: str = "softmax"  # softmax | focal
        gamma: float = 2.0  # focal only
        reduction: str = "weighted_mean"  # weighted_mean (LDAM-DRW / RIDE code) | mean

        def __post_init__(self) -> None:
            if self.loss not in ("softmax", "focal"):
                raise ValueError(f"loss must be softmax or focal, got '{self.loss}'")
            if self.reduction not in ("weighted_mean", "mean"):
                raise ValueError(f"reduction must be weighted_mean or mean, got '{self.reduction}'")
            if not 0 <= self.beta < 1:
                raise ValueError(f"beta must be in [0, 1), got {self.beta}")

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        self.register_buffer("weights", class_balanced_weights(ctx.train_counts, cfg.beta), persistent=False)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gamma = self.cfg.gamma if self.cfg.loss == "focal" else 0.0
        return focal_loss(logits, targets, gamma, self.weights, self.cfg.reduction)


@METHODS.register("logit_adjust")
class LogitAdjust(Method):
    """Logit-adjusted loss (Menon et al., ICLR 2021): CE(z + tau log pi, y); predict argmax z."""

    @dataclass
    class Config:
        tau: float = 1.0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, targets, self.class_counts, self.cfg.tau)


@METHODS.register("balanced_softmax")
class BalancedSoftmax(Method):
    """Balanced Softmax (Ren et al., NeurIPS 2020): CE(z + log n, y), i.e. logit adjustment with tau = 1."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, targets, self.class_counts, 1.0)


@METHODS.register("logit_adjust_posthoc")
class LogitAdjustPosthoc(Method):
    """Post-hoc logit adjustment: train with CE, predict argmax z - tau log pi (tau sweepable at eval).

    ``tau: val`` chooses tau on the run's val split over ``tau_grid`` when the stage ends (best mean per-class
    accuracy), e.g. as a no-training stage 2 (``epochs: 0``) on a CE run's weights.
    """

    val_options = ("tau",)

    @dataclass
    class Config:
        tau: float | str = 1.0  # prediction-time: longtail eval RUN --sweep method.tau=0:2:0.25; "val": chosen on val
        tau_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 10) for i in range(21)])  # 0..2

        def __post_init__(self) -> None:
            check_val_option("tau", self.tau, self.tau_grid)

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        prior = self.class_counts / self.class_counts.sum()
        return self.model.forward_head(feats) - torch.log(prior ** self.option("tau") + 1e-12)


@METHODS.register("ldam_drw")
class LDAMDRW(Method):
    """LDAM margins (Cao et al., NeurIPS 2019) on a cosine head, with deferred re-weighting from drw_epoch.

    z = s (cos - Delta_y on the true class), s = the cosine head's scale (model.head_scale, 30 in the paper).
    """

    requires_head = "cosine"

    @dataclass
    class Config:
        max_margin: float = 0.5
        drw_epoch: int = 160  # 0-based epoch from which class-balanced weights apply (-1: never)
        beta: float = 0.9999

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        self.register_buffer("margins", ldam_margins(ctx.train_counts, cfg.max_margin), persistent=False)
        self.register_buffer("drw_weights", class_balanced_weights(ctx.train_counts, cfg.beta), persistent=False)
        self.reweight = False

    def on_epoch_start(self, epoch: int, ctx: MethodContext) -> None:
        self.reweight = 0 <= self.cfg.drw_epoch <= epoch

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        s = self.model.head.scale
        onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        z = logits - s * self.margins[targets][:, None] * onehot
        return F.cross_entropy(z, targets, weight=self.drw_weights if self.reweight else None)


@METHODS.register("mixup")
class Mixup(Method):
    """Mixup (Zhang et al., ICLR 2018) around any loss method: x~ = lam x + (1 - lam) x[j], lam ~ Beta(a, a),
    L = lam l(f(x~), y) + (1 - lam) l(f(x~), y[j]), with l the loss of method ``base`` at its defaults.

    ``cutmix: true``: CutMix (Yun et al., ICCV 2019) instead: a box of x[j] pasted into x, its sides sqrt(1 - lam)
    of the image's, centre uniform, clipped at the border (as torchvision transforms v2's CutMix), and lam then
    the share of x kept. Both work on whole batches, so on every data path."""

    @dataclass
    class Config:
        alpha: float = 1.0
        base: str = "ce"  # a registered method whose loss is mixed (ce, focal, cb_loss, balanced_softmax, ...)
        cutmix: bool = False  # paste a box of the other image (CutMix) instead of blending the whole image

        def __post_init__(self) -> None:
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            if self.base == "mixup" or self.base not in METHODS:
                raise ValueError(f"base must be a registered loss method other than mixup, got '{self.base}'")
            if self.base == "ifl":  # mixup calls only the base's loss: no environments, no centres
                raise ValueError("mixup cannot wrap ifl: it would silently train plain mixup (IFL's environments "
                                 "and centres live in its training step); for Mixup + IFL use method ifl with "
                                 "mixup_alpha: 1.0")
            reason = why_not_a_loss(self.base, METHODS.get(self.base))
            if reason:
                raise ValueError(f"base {reason}; mixup mixes the loss of a loss method (ce, focal, cb_loss, "
                                 f"balanced_softmax, logit_adjust, logit_adjust_posthoc, ldam_drw)")

    @classmethod
    def head_needed(cls, opts: dict) -> str | None:
        base = opts.get("base", cls.Config.base)
        return METHODS.get(base).head_needed({}) if base in METHODS else None

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        base_cls = METHODS.get(cfg.base)
        # The base method shares the model; kept outside the module tree so its weights are not saved twice.
        base = base_cls(model, base_cls.Config(), ctx).to(ctx.device)
        object.__setattr__(self, "_base", base)

    def on_epoch_start(self, epoch: int, ctx: MethodContext) -> None:
        self._base.on_epoch_start(epoch, ctx)  # e.g. deferred re-weighting

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training:
            return super().forward(images, targets)
        lam = float(torch.distributions.Beta(self.cfg.alpha, self.cfg.alpha).sample())
        perm = torch.randperm(len(images), device=images.device)
        if self.cfg.cutmix:
            images, lam = _cut_and_paste(images, perm, lam)
            logits = self.model(images)
        else:
            logits = self.model(lam * images + (1 - lam) * images[perm])
        loss = lam * self._base.loss(logits, targets) + (1 - lam) * self._base.loss(logits, targets[perm])
        return {"loss": loss, "logits": logits}


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
