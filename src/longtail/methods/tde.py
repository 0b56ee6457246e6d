"""De-confound and De-confound-TDE (Tang, Huang, Zhang, NeurIPS 2020; spec tde.md).

Training: plain cross-entropy on the causal-norm head's logits, while a moving average of the batch-mean
features (the head direction) is kept as a buffer of the method. Prediction: ``deconfound`` uses the
causal-norm logits as they are; ``tde`` removes alpha times each feature's projection on the head direction
(the total direct effect, paper Eq. 8). alpha is a prediction-time setting: ``longtail eval RUN
--set method.alpha=2`` re-scores without training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longtail.dist import broadcast_from_main
from longtail.errors import CheckpointError, ConfigError, DataError
from longtail.methods.base import Method, MethodContext
from longtail.models import Classifier
from longtail.models.heads import CausalNormHead
from longtail.registry import METHODS


@METHODS.register("deconfound")
class Deconfound(Method):
    """De-confound: causal-norm classifier trained with CE and a moving-average head direction."""

    requires_head = "causal_norm"

    @dataclass
    class Config:
        momentum: float = 0.9  # mu of the head-direction average (CIFAR: fixed 0.9)
        momentum_schedule: str = "fixed"  # fixed | lr_scaled: mu = 1 - 0.1 min(50 lr, 1) per epoch (ImageNet-LT)
        average: str = "accumulate"  # accumulate: e = mu e + mean(f) (reference); ema: e = mu e + (1-mu) mean(f)

        def __post_init__(self) -> None:
            if self.momentum_schedule not in ("fixed", "lr_scaled"):
                raise ValueError(f"momentum_schedule must be fixed or lr_scaled, got '{self.momentum_schedule}'")
            if self.average not in ("accumulate", "ema"):
                raise ValueError(f"average must be accumulate or ema, got '{self.average}'")

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        if not isinstance(model.head, CausalNormHead):  # config validation says so earlier; API users too
            raise ConfigError(f"{type(self).__name__.lower()} needs model.head=causal_norm "
                             f"(got {type(model.head).__name__})")
        # (D,) moving average of batch-mean features; saved with the weights it belongs to (defect D4).
        self.register_buffer("head_direction", torch.zeros(model.feature_dim))
        # alpha by the rule of thumb (alpha x mean cos = 1) on val (else train) features at the end of training;
        # 0 until computed. Used by alpha=auto.
        self.register_buffer("suggested_alpha", torch.zeros(()))
        self.mu = cfg.momentum

    def on_epoch_start(self, epoch: int, ctx: MethodContext) -> None:
        if self.cfg.momentum_schedule == "lr_scaled":
            # The reference rule (spec tde.md 3.1): 0.9 while lr >= 0.02, rising to 1 as lr -> 0.
            self.mu = 1.0 - 0.1 * min(50.0 * ctx.lr, 1.0)

    @torch.no_grad()
    def _update_direction(self, feats: torch.Tensor) -> None:
        mean = feats.detach().float().mean(0)  # (D,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank holds the same direction: average the batch means across ranks first.
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        if self.cfg.average == "ema":
            self.head_direction.mul_(self.mu).add_(mean, alpha=1 - self.mu)
        else:
            self.head_direction.mul_(self.mu).add_(mean)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.model.forward_features(images)  # (B, D)
        logits = self.model.forward_head(feats)  # (B, C)
        if self.training:
            self._update_direction(feats)
        return {"loss": F.cross_entropy(logits, targets), "logits": logits}

    @torch.no_grad()
    def on_stage_end(self, ctx: MethodContext) -> None:
        loader = ctx.loader
        if loader is None or self.head_direction.norm() == 0:
            return
        split = "val" if "val" in loader.ds.splits else "train"  # never test
        feats, _ = self.split_features(loader, split)
        self.suggested_alpha.fill_(suggest_alpha(feats, self.head_direction, self.model.head.num_heads))
        broadcast_from_main(self.suggested_alpha)  # DDP: every rank computed it; keep rank 0's

    def alpha(self) -> float:
        return 0.0

    def check_direction(self) -> None:
        if not torch.isfinite(self.head_direction).all() or self.head_direction.norm() == 0:
            raise CheckpointError("the TDE head direction is zero or not finite: this model was not trained with "
                               "deconfound/tde, or its checkpoint lacks the direction; TDE needs it")

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha()
        if alpha == 0:
            return self.model.forward_head(feats)
        self.check_direction()
        return self.model.head.tde(feats, self.head_direction, alpha)


@METHODS.register("tde")
class TDE(Deconfound):
    """De-confound-TDE: De-confound training, counterfactual (total direct effect) prediction with alpha."""

    @dataclass
    class Config(Deconfound.Config):
        # TDE strength at prediction time (CIFAR-10 1.0, CIFAR-100 1.5, ImageNet-LT 3.0), or "auto": the rule
        # of thumb alpha x mean cos(x, d) = 1 measured on val (else train) features when training ended.
        alpha: float | str = 1.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if isinstance(self.alpha, str) and self.alpha != "auto":
                raise ValueError(f"alpha must be a number or 'auto', got '{self.alpha}'")

    def alpha(self) -> float:
        if self.cfg.alpha == "auto":
            if self.suggested_alpha.item() <= 0:
                raise CheckpointError("alpha=auto: this model has no suggested alpha (it is computed when training "
                                      "ends); set method.alpha to a number")
            return self.suggested_alpha.item()
        return float(self.cfg.alpha)


def suggest_alpha(features: torch.Tensor, direction: torch.Tensor, num_heads: int) -> float:
    """The README rule of thumb: alpha = 1 / mean over samples and heads of cos(x^k, d^k).

    Use training or validation features, never test ones.
    """
    xk = F.normalize(features.unflatten(-1, (num_heads, -1)), dim=-1, eps=1e-12)  # (N, K, D/K)
    dk = F.normalize(direction.unflatten(-1, (num_heads, -1)), dim=-1, eps=1e-12)  # (K, D/K)
    mean_cos = torch.einsum("nkd,kd->nk", xk, dk).mean().item()
    if mean_cos <= 0:
        raise DataError(f"mean cos with the head direction is {mean_cos:.3g}; cannot suggest an alpha")
    return 1.0 / mean_cos


def background_exempted_tde(deconf_logits: torch.Tensor, tde_logits: torch.Tensor, bg_index: int) -> torch.Tensor:
    """Background-exempted TDE probabilities for detection heads (TDE paper Eq. 9).

    p = softmax(deconf_logits), q = softmax(tde_logits), both (N, C+1) over foreground classes and the
    background class ``bg_index``. Returns (N, C+1) scores: score_bg = p_bg, and for foreground i
    score_i = (1 - p_bg) q_i / sum_{j != bg} q_j. Probabilities, never re-softmaxed (defect D11).
    """
    p = deconf_logits.float().softmax(-1)
    q = tde_logits.float().softmax(-1)
    fg = torch.ones(q.shape[-1], dtype=torch.bool, device=q.device)
    fg[bg_index] = False
    p_bg = p[..., bg_index : bg_index + 1]  # (N, 1)
    q_fg = q * fg
    scores = (1 - p_bg) * q_fg / q_fg.sum(-1, keepdim=True).clamp_min(1e-12)
    scores[..., bg_index] = p_bg.squeeze(-1)
    return scores
