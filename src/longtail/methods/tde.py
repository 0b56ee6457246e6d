"""De-confound and De-confound-TDE (Tang, Huang, Zhang, NeurIPS 2020; spec tde.md).

Training: plain cross-entropy on the causal-norm head's logits, while a moving average of the batch-mean
features (the head direction) is kept as a buffer of the method. Prediction: ``deconfound`` uses the
causal-norm logits as they are; ``tde`` removes alpha times each feature's projection on the head direction
(the total direct effect, paper Eq. 8). alpha is a prediction-time setting: ``longtail eval RUN
--set method.alpha=2`` re-scores without training. ``alpha: val`` (the default) chooses it on the run's val
split when training ends; ``tde_statistics`` measures what decides whether TDE helps on a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longtail.dist import broadcast_from_main
from longtail.errors import CheckpointError, ConfigError, DataError
from longtail.methods.base import BatchInfo, Method, MethodContext
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

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                batch: BatchInfo | None = None) -> dict[str, torch.Tensor]:
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


def alpha_grid() -> list[float]:
    """0, 0.25, ..., 5: the alphas ``alpha: val`` chooses from (the paper's Fig. 4 sweeps 0 to 5; its CIFAR and
    ImageNet-LT values 1.0, 1.5 and 3.0 are on it)."""
    return [0.25 * i for i in range(21)]


@METHODS.register("tde")
class TDE(Deconfound):
    """De-confound-TDE: De-confound training, counterfactual (total direct effect) prediction with alpha.

    ``alpha: val`` (the default) sweeps alpha over ``alpha_grid`` on the run's val split when training ends and
    keeps the best mean per-class accuracy (``Method.val_options``: the curve goes to metrics.json under
    ``chosen_on_val`` and to plots/); a run without a val split predicts with ``alpha_fallback`` instead. At alpha 0
    TDE predicts as De-confound (``off_values``): when a val split shows TDE below that, the run warns.
    """

    val_options = ("alpha",)
    off_values = {"alpha": (0.0, "De-confound")}

    @dataclass
    class Config(Deconfound.Config):
        # TDE strength at prediction time: "val" (chosen on the run's val split over alpha_grid), a number (the
        # papers' CIFAR-10 1.0, CIFAR-100 1.5, ImageNet-LT 3.0), or "auto": the rule of thumb alpha x mean
        # cos(x, d) = 1 measured on val (else train) features when training ended.
        alpha: float | str = "val"
        alpha_grid: list[float] = field(default_factory=alpha_grid)
        # alpha of a run with alpha=val and no val split (never chosen on test): a number or "auto".
        alpha_fallback: float | str = 1.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if isinstance(self.alpha, str) and self.alpha not in ("auto", "val"):
                raise ValueError(f"alpha must be a number, 'val' (chosen on the val split over alpha_grid) or "
                                 f"'auto' (alpha x mean cos = 1), got '{self.alpha}'")
            if isinstance(self.alpha_fallback, str) and self.alpha_fallback != "auto":
                raise ValueError(f"alpha_fallback must be a number or 'auto', got '{self.alpha_fallback}'")
            if not self.alpha_grid:
                raise ValueError("alpha_grid must hold at least one value (it is what alpha=val chooses from)")

    def option(self, name: str) -> float:
        if name != "alpha":
            return super().option(name)
        value = self.cfg.alpha
        chosen = getattr(self, "chosen_alpha", None)
        if value == "val" and (chosen is None or chosen.isnan()):
            # Not chosen yet: the engine chooses it when training ends (a run without a val split has alpha_fallback
            # in its config instead); until then, e.g. a method built through the Python API, use the fallback.
            value = self.cfg.alpha_fallback
        if value == "auto":
            if self.suggested_alpha.item() <= 0:
                raise CheckpointError("alpha=auto: this model has no suggested alpha (it is computed when training "
                                      "ends); set method.alpha to a number")
            return self.suggested_alpha.item()
        if value == "val":
            return float(chosen)
        return float(value)

    def alpha(self) -> float:
        return self.option("alpha")

    def report(self) -> dict:
        # The rule of thumb's alpha (what alpha=auto predicts with), measured when training ended: kept in a buffer.
        s = self.suggested_alpha.item()
        return {"suggested_alpha": round(s, 4)} if s > 0 else {}

    @torch.no_grad()
    def diagnostics(self, feats: torch.Tensor, targets: torch.Tensor, class_names: list[str] | None = None) -> dict:
        if self.head_direction.norm() == 0:
            return {}
        head = self.model.head
        alpha = self.alpha()
        if alpha == 0:  # predicting as De-confound (e.g. alpha=val chose 0): measure what TDE would have done
            fallback = self.cfg.alpha_fallback
            alpha = float(fallback) if not isinstance(fallback, str) and fallback > 0 else 1.0
        return tde_statistics(feats, targets, self.head_direction, head.weight, head.num_heads, head.tau, head.gamma,
                              self.class_counts, alpha=alpha, class_names=class_names)


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


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of v, ties sharing their mean rank."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for u in np.unique(v):
        r[v == u] = r[v == u].mean()
    return r


def spearman(a, b) -> float | None:
    """Spearman rank correlation of two sequences (None when either is constant)."""
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def tde_statistics(features: torch.Tensor, labels: torch.Tensor, direction: torch.Tensor, weight: torch.Tensor,
                   num_heads: int, tau: float, gamma: float, train_counts: torch.Tensor | None = None,
                   alpha: float = 1.0, class_names: list[str] | None = None) -> dict:
    """The statistics that decide what TDE does to a split's predictions (benchmarks/results/tde_when_it_helps.md).

    TDE (paper Eq. 8) lowers logit i of a sample x by alpha (tau/K) sum_k cos(x^k, d^k) p_i^k, with p_i^k =
    d^k . w_i^k / (||w_i^k|| + gamma) the head-direction projection of class i's damped weight in head k. Only the
    differences between classes move a prediction: TDE acts as a per-class prior shift, scaled by how far each
    feature points along d. It corrects the long tail when p follows class frequency (the head classes' weights
    lie along d, the mean training feature) and the shift is of the size of the logit margins; it hurts when p
    does not follow frequency (a class whose weight lies off d, whatever its size, gains at every sample) or when
    the shift dwarfs the margins (features concentrated along d: mean cos near 1, little left to tell classes by).

    features: (N, D) backbone features of a split (val or train to choose anything; any split to read); labels:
    (N,); direction: (D,) the head direction; weight: (C, D) the causal-norm weights; train_counts: (C,);
    class_names: for the summary line.

    Returns (lists are per class, None where a class has no sample in the split):
    ``mean_cos`` (over samples and heads; ``suggested_alpha`` = 1 / mean_cos, the paper's rule of thumb),
    ``per_class_mean_cos``, ``weight_projection`` (mean over heads of p_i^k), ``logit_shift`` (the mean change of
    each logit at ``alpha``, minus its mean over classes), ``shift_spread`` (max - min of it), ``median_margin``
    (median top-1 minus top-2 De-confound logit), ``shift_to_margin`` (their ratio), ``projection_vs_count``
    (Spearman correlation of weight_projection with train_counts: TDE's premise is > 0), ``shift_vs_log_prior``
    (Pearson correlation of logit_shift with -log(train count): 1 when TDE acts as a logit adjustment),
    ``deconf_over_prediction`` / ``tde_over_prediction`` (per class: predictions over samples, at alpha 0 and at
    ``alpha``), ``deconf_prediction_tv`` / ``tde_prediction_tv`` (total variation distance between the predicted
    and the true class distribution of the split, 0..1), ``deconf_head_bias`` (Spearman correlation of
    De-confound's over-prediction with train_counts: the head bias TDE is there to remove; near 0 or below,
    nothing is left to remove), ``favoured_class`` and ``penalised_class`` (largest and smallest logit_shift),
    and a one-line ``summary``.
    """
    k = num_heads
    c = weight.shape[0]
    feats = features.float()
    xk = F.normalize(feats.unflatten(-1, (k, -1)), dim=-1, eps=1e-12)  # (N, K, D/K)
    dk = F.normalize(direction.float().unflatten(-1, (k, -1)), dim=-1, eps=1e-12)  # (K, D/K)
    wk = weight.float().unflatten(-1, (k, -1))
    wk = wk / (wk.norm(dim=-1, keepdim=True) + gamma)  # (C, K, D/K) damped, as the head
    cos = torch.einsum("nkd,kd->nk", xk, dk)  # (N, K)
    proj = torch.einsum("ckd,kd->ck", wk, dk)  # (C, K)
    shift = -alpha * (tau / k) * (cos @ proj.T)  # (N, C) TDE logit minus De-confound logit
    mean_shift = shift.mean(0)
    mean_shift = mean_shift - mean_shift.mean()  # (C,) only differences between classes move a prediction
    deconf = (tau / k) * torch.einsum("nkd,ckd->nc", xk, wk)  # (N, C)
    top2 = deconf.topk(min(2, c), dim=1).values
    margin = float((top2[:, 0] - top2[:, -1]).median()) if len(feats) else float("nan")
    labels = labels.to(cos.device)
    true_n = torch.bincount(labels, minlength=c).double()  # (C,)

    def over_prediction(logits: torch.Tensor) -> tuple[list[float | None], float]:
        """(C,) how many samples a class is predicted for, over how many it has (1: unbiased; None: absent), and
        the total variation distance between the predicted and the true class distribution of the split."""
        got = torch.bincount(logits.argmax(1), minlength=c).double()
        tv = 0.5 * float((got - true_n).abs().sum() / max(len(labels), 1))
        return [round(float(g / n), 4) if n else None for g, n in zip(got, true_n, strict=True)], tv

    per_cos = []
    for i in range(c):
        m = labels == i
        per_cos.append(round(float(cos[m].mean()), 4) if m.any() else None)
    mean_cos = float(cos.mean())
    proj_mean = proj.mean(1)  # (C,)
    spread = float(mean_shift.max() - mean_shift.min())
    (deconf_over, deconf_tv), (tde_over, tde_tv) = over_prediction(deconf), over_prediction(deconf + shift)
    rho = head_bias = fit = None
    if train_counts is not None:
        counts = train_counts.double().cpu().numpy()
        rho = spearman(proj_mean.cpu().numpy(), counts)
        present = [i for i in range(c) if deconf_over[i] is not None]
        head_bias = spearman([deconf_over[i] for i in present], counts[present]) if len(present) > 1 else None
        log_prior = -np.log(np.maximum(counts, 1))  # the long-tail correction a balanced test wants, up to scale
        ms = mean_shift.double().cpu().numpy()
        fit = float(np.corrcoef(ms, log_prior)[0, 1]) if ms.std() > 0 and log_prior.std() > 0 else None
    fav, pen = int(mean_shift.argmax()), int(mean_shift.argmin())
    names = class_names if class_names is not None and len(class_names) == c else [str(i) for i in range(c)]
    out = {
        "num_samples": len(feats),
        "alpha": alpha,
        "mean_cos": round(mean_cos, 4),
        "suggested_alpha": round(1 / mean_cos, 4) if mean_cos > 0 else None,
        "per_class_mean_cos": per_cos,
        "weight_projection": [round(float(v), 4) for v in proj_mean],
        "logit_shift": [round(float(v), 4) for v in mean_shift],
        "shift_spread": round(spread, 4),
        "median_margin": round(margin, 4),
        "shift_to_margin": round(spread / margin, 4) if margin > 0 else None,
        "projection_vs_count": None if rho is None else round(rho, 4),
        "shift_vs_log_prior": None if fit is None else round(fit, 4),
        "deconf_over_prediction": deconf_over,
        "tde_over_prediction": tde_over,
        "deconf_prediction_tv": round(deconf_tv, 4),
        "tde_prediction_tv": round(tde_tv, 4),
        "deconf_head_bias": None if head_bias is None else round(head_bias, 4),
        "favoured_class": fav,
        "penalised_class": pen,
    }
    worst = max((i for i in range(c) if tde_over[i] is not None), key=lambda i: tde_over[i], default=None)
    out["summary"] = (
        f"mean cos(x, d) {mean_cos:.2f} (alpha=auto would be {1 / mean_cos:.2f}); at alpha={alpha:g} TDE shifts the "
        f"logits of the classes apart by up to {spread:.2f} (median De-confound margin {margin:.2f}), most in favour "
        f"of class {names[fav]} and against class {names[pen]}"
        + ("" if fit is None else f"; the shift follows -log(train count) with Pearson r {fit:.2f} and the "
           f"classes' weight projections on the head direction follow their counts with Spearman rho {rho:.2f} "
           f"(TDE corrects the long tail when both are near 1)")
        + f"; De-confound's predicted class distribution is {deconf_tv:.2f} (total variation) from the true one, "
        f"TDE's {tde_tv:.2f}"
        + ("" if head_bias is None else f", and De-confound over-predicts classes by their train counts with rho "
           f"{head_bias:.2f} (a small distance or rho: little head bias left for TDE to remove)")
        + ("" if worst is None else f"; under TDE class {names[worst]} is predicted {tde_over[worst]:.1f}x as often "
           f"as it occurs")
    )
    return out


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
