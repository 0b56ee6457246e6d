"""DLSA: Dynamic Label Space Adjustment (Xu, Li, Li, Lu, ECCV 2022; spec dlsa.md), a stage-2 method on the
frozen features of any stage-1 model.

A cascade of flow filters: stage d trains a normalising flow (masked autoregressive blocks with batch norm,
``zuko``) onto a Gaussian mixture with fixed random means, takes out the ~30 % of the remaining training
samples it models best (threshold = a training-set percentile of the likelihood, reused at test), and gives
them to a cluster-aided classifier (CAC_d). What is left after the last stage goes to a Balanced-Softmax
linear classifier. ``predict`` routes every sample to exactly one classifier (spec section 7).

Why the training runs inside ``on_stage_start`` and not in the fit loop: DLSA never touches images. It
trains several flows and heads one after the other on pre-extracted feature tensors, each with its own
optimiser, epoch count and pair sampler; driving that through the image loop would re-run the frozen
backbone at every step. So a ``dlsa`` stage has ``epochs: 0`` (like ``ncm``); its own epoch counts are
method options (``flow_epochs``, ``head_epochs``).

Deviations from the reference code (spec section 11): heads are selected on a validation split when the
dataset has one, else at the last epoch (never on test, X1); ``z_source`` is configurable (X2); head
initialisation from stage 1 is strict and checked (X5, section 10); unknown options are errors (X7).

Extensions for features unlike the reference's 2048-d ResNet-50 ones (off by default; on in the CIFAR
recipes), all decided inside ``fit`` on training data only: ``flow_lr`` may be a list of candidates, chosen
per stage by the training cluster purity that also picks the flow's epoch; ``center_std: auto`` scales the
mixture means to the flow's dimension (``resolve_center_std``); ``dead_channel_tol`` leaves feature channels
without training variance out of the flows. What ``fit`` chose is the method's ``report()`` (metrics.json's
``method_report``), saved with the weights.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.dist import broadcast_from_main, object_from_main
from longtail.errors import ConfigError, DataError, TrainingError
from longtail.methods.base import MethodContext, ParamGroup
from longtail.methods.decoupling import _FrozenBackbone
from longtail.models import Classifier
from longtail.models.heads import LinearHead
from longtail.registry import FEATURE_EVALUATIONS, METHODS

log = logging.getLogger("longtail")


def _zuko():
    """zuko, imported lazily: it is an optional dependency (``pip install longtail[flows]``)."""
    try:
        import zuko
    except ImportError as e:
        raise ImportError(
            "DLSA needs the normalising-flow library zuko: pip install 'longtail[flows]' (or pip install zuko)"
        ) from e
    return zuko


# ----------------------------------------------------------------------------- the flow filter


class BatchNormFlow(nn.Module):
    """RealNVP-style batch-norm bijection: y = exp(log_gamma) (x - mean) / sqrt(var + eps) + beta.

    Training: batch statistics (and running averages, momentum 0.9 as in the reference); eval: running ones.
    log|det J| = sum_d [log_gamma_d - 0.5 log(var_d + eps)].
    """

    def __init__(self, dim: int, momentum: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.momentum, self.eps = momentum, eps

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_(mean.detach() * (1 - self.momentum))
                self.running_var.mul_(self.momentum).add_(var.detach() * (1 - self.momentum))
            return mean, var
        return self.running_mean, self.running_var

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self._stats(x)
        y = self.log_gamma.exp() * (x - mean) / torch.sqrt(var + self.eps) + self.beta
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(
            self.running_var + self.eps
        ) + self.running_mean


class FlowGMM(nn.Module):
    """A masked autoregressive flow x -> u onto a K-component Gaussian mixture with fixed random means.

    ``blocks`` x [MADE (zuko ``MaskedAutoregressiveTransform``, affine), BatchNormFlow], the variable order
    reversed between blocks. Means: randn(K, D) * center_std, a buffer (never learned); identity covariance,
    uniform weights (spec section 3).
    """

    def __init__(
        self,
        dim: int,
        clusters: int,
        blocks: int = 2,
        hidden: int | None = None,
        hidden_layers: int = 2,
        center_std: float = 0.05,
        batch_norm: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        zuko = _zuko()
        if dim < 2:
            raise ValueError(f"a masked autoregressive flow needs a feature dimension >= 2, got {dim}")
        hidden = hidden or dim
        self.dim, self.clusters = dim, clusters
        self.layers = nn.ModuleList()
        for i in range(blocks):
            order = torch.arange(dim) if i % 2 == 0 else torch.arange(dim).flip(0)
            self.layers.append(
                zuko.flows.MaskedAutoregressiveTransform(
                    features=dim, order=order, hidden_features=[hidden] * hidden_layers
                )
            )
            if batch_norm:
                self.layers.append(BatchNormFlow(dim))
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("means", torch.randn(clusters, dim, generator=g) * center_std)  # (K, D)

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) features -> (B, D) latent u and (B,) log|det du/dx|."""
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            if isinstance(layer, BatchNormFlow):
                x, ld = layer(x)
            else:
                x, ld = layer().call_and_ladj(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """(B, D) latent -> (B, D) features (eval mode: batch norm uses its running statistics)."""
        for layer in reversed(self.layers):
            u = layer.inverse(u) if isinstance(layer, BatchNormFlow) else layer().inv(u)
        return u

    def component_log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) log p_k(x) = -D/2 log 2pi - ||u - mu_k||^2 / 2 + S(x), and the (B, D) latent u."""
        u, logdet = self.transform(x)
        # ||u - mu||^2 expanded: a (B, K, D) difference would not fit for D = 2048, K = 500
        d2 = (u * u).sum(1, keepdim=True) - 2 * u @ self.means.T + (self.means * self.means).sum(1)
        return -0.5 * self.dim * math.log(2 * math.pi) - 0.5 * d2.clamp_min(0) + logdet[:, None], u

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) log p(x) = logsumexp_k log p_k(x) - log K: the filter score."""
        lp, _ = self.component_log_probs(x)
        return lp.logsumexp(1) - math.log(self.clusters)

    @torch.no_grad()
    def score(self, x: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,) log p(x), (N,) hard cluster argmax_k log p_k(x) and (N, D) latent u, in batches."""
        out = [self.component_log_probs(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        lp = torch.cat([o[0] for o in out])
        return lp.logsumexp(1) - math.log(self.clusters), lp.argmax(1), torch.cat([o[1] for o in out])


class ClusterAidedHead(nn.Module):
    """CAC, input type "XZP": logits = Linear_x(x) + Linear_zp([z; P(x)]) with P(x) the cluster's class histogram."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.lin_x = nn.Linear(dim, num_classes)
        self.lin_zp = nn.Linear(dim + num_classes, num_classes)

    def forward(self, x: torch.Tensor, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.lin_x(x) + self.lin_zp(torch.cat([z, p], 1))  # (B, C)


class RegularHead(nn.Module):
    """The last stage's classifier, input type "XZ": logits = Linear_x(x) + Linear_z(z)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.lin_x = nn.Linear(dim, num_classes)
        self.lin_z = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, z: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin_x(x) + self.lin_z(z)  # (B, C)


# ----------------------------------------------------------------------------- configuration

# The reference's mixture means (spec section 3.2): randn(K, D) * 0.05, set for D = 2048 (ResNet-50 features).
REFERENCE_CENTER_STD = 0.05
REFERENCE_DIM = 2048


def resolve_center_std(center_std: float | str, dim: int) -> float:
    """The per-coordinate std of the mixture means for a flow on ``dim`` feature channels.

    A number is used as given (reference: 0.05). ``auto`` is ``0.05 * sqrt(2048 / dim)``. Why: every flow
    block ends in batch norm, so the latent u has unit variance per coordinate over the training set whatever
    the scale of the features; what shapes the mixture is then how far apart its means are in those units.
    ``||mu_k|| ~ center_std * sqrt(dim)`` and ``||mu_i - mu_j|| ~ center_std * sqrt(2 dim)``, and the log-odds
    log p_i(u) - log p_j(u) of two components are of that order. Holding ``center_std * sqrt(dim)`` at the
    reference's 0.05 * sqrt(2048) = 2.26 keeps the means' spread against the unit-variance latent (mean norm
    ~2.26, distance between two means ~3.2) what it was for 2048-d features: 0.2 for 128 channels, 0.05 for
    2048. A fixed 0.05 on 128-d features would put the means 0.8 apart, inside the noise of one component.
    """
    if center_std == "auto":
        return REFERENCE_CENTER_STD * math.sqrt(REFERENCE_DIM / dim)
    return float(center_std)


@dataclass
class DLSAConfig:
    """DLSA options (defaults: the reference ImageNet-LT CE config, spec section 9).

    Three options adapt DLSA to features unlike the reference's 2048-d ResNet-50 ones, all decided on
    training data inside the method (defaults: off, as the reference): ``flow_lr`` as a list of candidates
    chosen on training cluster purity, ``center_std: auto`` (see ``resolve_center_std``) and
    ``dead_channel_tol`` (feature channels without training variance are left out of the flows).
    """

    max_depth: int = 1  # flow filters in the cascade; 0: only the regular (Balanced Softmax) classifier
    filter_fraction: float = 0.3  # rho: share of each stage's remaining TRAIN samples taken out (llh_proportion)
    clusters: int = 500  # K, mixture components (not one per class)
    # mixture means: randn(K, D_flow) * center_std, fixed; auto: 0.05 * sqrt(2048 / D_flow) (resolve_center_std)
    center_std: float | str = 0.05
    flow_blocks: int = 2  # MADE + batch-norm blocks
    flow_hidden: int = 0  # MADE hidden width; 0: the flow's input dimension (reference: the feature dimension)
    flow_hidden_layers: int = 2  # MADE hidden layers (reference "n_hidden 1" = D->H->H->2D, two hidden layers)
    flow_batch_norm: bool = True
    flow_epochs: int = 50
    flow_batch_size: int = 1024  # pairs per step (x+ and x- each)
    # plain SGD, momentum 0, constant. A list: candidates, each trains the stage's flow from the same start; the
    # one whose selected epoch has the most pure clusters (then the higher overall purity) is kept, per stage.
    flow_lr: float | list[float] = 0.2
    flow_grad_clip: float = 0.0  # 0: none (the reference's clip call does nothing: X8)
    # > 0: channels whose training variance is <= this x the mean channel variance are left out of the flows
    # (dead ReLU channels: zero variance, log(var) ~ log(eps) in batch norm); 0: every channel (reference)
    dead_channel_tol: float = 0.0
    weight_q: float = 2.0  # class weight w_c ~ (n_max / n_c)^q in the likelihood loss
    lambda_lh: float = 2.0
    lambda_bal: float = 1.0
    lambda_pur: float = 0.02
    posterior_momentum: float = 0.7  # EMA of the mean cluster posterior in the balance loss
    min_purity: float = 0.7  # flow-epoch (and flow_lr) selection only (section 4.3): clusters purer than this...
    min_size: int = 10  # ...and larger than this count
    max_cluster_size: int = 5000  # epochs whose largest cluster reaches this are not kept
    z_source: str = "feature"  # feature (reference code: z = x) | flow_latent (the paper's figure)
    cac_prior: str = "subset"  # Balanced-Softmax counts of the CACs: subset (reference) | full
    regular_prior: str = "full"  # ... of the regular classifier: full (reference) | subset
    head_epochs: int = 150
    head_batch_size: int = 128
    head_lr: float = 0.01  # SGD, momentum 0, constant; 1e-4 with head_init=stage1 (PaCo features)
    head_init: str = "random"  # random | stage1: Linear_x of every head from the stage-1 linear head (checked)
    head_select: str = "auto"  # auto: best on the val samples routed to the head (if val exists), else last | last
    eval_every: int = 5  # head epochs between val evaluations (head_select=auto with a val split)
    normalize_features: bool = False  # L2-normalise features first (PaCo's head acts on normalised features)
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {
            "z_source": ("feature", "flow_latent"),
            "cac_prior": ("subset", "full"),
            "regular_prior": ("subset", "full"),
            "head_init": ("random", "stage1"),
            "head_select": ("auto", "last"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")
        if self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        if not 0 < self.filter_fraction < 1:
            raise ValueError(f"filter_fraction must be in (0, 1), got {self.filter_fraction}")
        for key in ("clusters", "flow_blocks", "flow_epochs", "flow_batch_size", "head_batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.head_epochs < 0 or self.flow_hidden < 0 or self.flow_hidden_layers < 1:
            raise ValueError("head_epochs and flow_hidden must be >= 0, flow_hidden_layers >= 1")
        if isinstance(self.center_std, str):
            if self.center_std != "auto":
                raise ValueError(f"center_std must be a positive number or auto, got '{self.center_std}'")
            if not self.flow_batch_norm:
                raise ValueError(
                    "center_std=auto assumes the unit-variance latent of flow_batch_norm=true; "
                    "set center_std to a number"
                )
        elif not (math.isfinite(self.center_std) and self.center_std > 0):
            raise ValueError(f"center_std must be a positive number or auto, got {self.center_std}")
        lrs = self.flow_lrs
        if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(
                f"flow_lr must be a positive number or a non-empty list of distinct ones, got {self.flow_lr}"
            )
        if not 0 <= self.dead_channel_tol < 1:
            raise ValueError(
                f"dead_channel_tol must be in [0, 1) (a share of the mean channel variance), "
                f"got {self.dead_channel_tol}"
            )

    @property
    def flow_lrs(self) -> list[float]:
        """The flow learning rates to try (one: no selection)."""
        return [float(v) for v in self.flow_lr] if isinstance(self.flow_lr, list | tuple) else [float(self.flow_lr)]


# ----------------------------------------------------------------------------- the cascade (pure tensors)


def _class_weights(labels: torch.Tensor, num_classes: int, q: float) -> torch.Tensor:
    """(C,) w_c = (n_max / n_c)^q / sum_c' (n_max / n_c')^q over the classes present; 0 for absent ones."""
    n = torch.bincount(labels, minlength=num_classes).double()
    w = torch.zeros(num_classes, dtype=torch.float64)
    present = n > 0
    w[present] = (n.max() / n[present]) ** q
    return (w / w.sum()).float()


def cluster_purity(
    clusters: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, C) joint counts, (K,) sizes and (K,) purity (majority-class share; 0 for empty clusters)."""
    joint = torch.zeros(k, num_classes, dtype=torch.long, device=labels.device)
    joint.index_put_((clusters, labels), torch.ones_like(labels), accumulate=True)
    sizes = joint.sum(1)
    purity = joint.max(1).values.double() / sizes.clamp_min(1)
    return joint, sizes, purity


class _FlowDiverged(TrainingError):
    """A flow's loss or training scores became non-finite at ``epoch`` (1-based); ``history``: its epochs so far."""

    def __init__(self, message: str, epoch: int, history: dict) -> None:
        super().__init__(message)
        self.epoch, self.history = epoch, history


def _before_load(module: DLSACascade, state_dict: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: the flows' input dimension (the live channels) is only known after ``fit``,
    so rebuild them to the saved ``live_channels`` before their weights load. Checkpoints written before
    dead-channel dropping existed load as "every channel live, empty report"."""
    key = prefix + "live_channels"
    if key not in state_dict:
        state_dict[key] = torch.ones(module.dim, dtype=torch.bool)
    state_dict.setdefault(prefix + "_extra_state", {"report": {}})
    live = state_dict[key]
    if live.shape == module.live_channels.shape:
        module._resize_flows(int(live.sum()))


def _r(v: float, digits: int = 4) -> float:
    """A float rounded to ``digits`` significant digits, for metrics.json."""
    return float(f"{v:.{digits}g}")


class DLSACascade(nn.Module):
    """Flows, thresholds, cluster priors and classifiers of a DLSA cascade; trains and predicts on feature tensors.

    State (all saved by ``state_dict``): ``live_channels`` (dim,) bool, the feature channels the flows see
    (``dead_channel_tol``); ``flows.d`` on those channels, ``thresholds`` (D,), ``cluster_priors`` (D, K, C),
    ``cacs.d``, ``regular``, ``stage_train_counts`` (D+1,), the training samples each stage took; and, as
    extra state, ``report``: what ``fit`` chose and measured (``fit``'s summary), for metrics.json.
    """

    def __init__(self, dim: int, num_classes: int, cfg: DLSAConfig, train_counts: torch.Tensor) -> None:
        super().__init__()
        self.cfg, self.dim, self.num_classes = cfg, dim, num_classes
        depth, k = cfg.max_depth, cfg.clusters
        self.flows = self._make_flows(dim)
        self.cacs = nn.ModuleList(ClusterAidedHead(dim, num_classes) for _ in range(depth))
        self.regular = RegularHead(dim, num_classes)
        self.register_buffer("live_channels", torch.ones(dim, dtype=torch.bool))  # (dim,) flow input channels
        self.register_buffer("thresholds", torch.full((depth,), float("inf")))  # tau_d (train percentile)
        self.register_buffer("cluster_priors", torch.zeros(depth, k, num_classes))  # pi_d[k] (C,)
        self.register_buffer("stage_train_counts", torch.zeros(depth + 1, dtype=torch.long))
        self.register_buffer("train_counts", train_counts.clone().float(), persistent=False)  # (C,) full counts
        self.report: dict = {}  # fit's summary (JSON-able); saved as extra state
        self.register_load_state_dict_pre_hook(_before_load)

    def _make_flows(self, n: int) -> nn.ModuleList:
        cfg = self.cfg
        return nn.ModuleList(
            FlowGMM(
                n,
                cfg.clusters,
                cfg.flow_blocks,
                cfg.flow_hidden or n,
                cfg.flow_hidden_layers,
                resolve_center_std(cfg.center_std, n),
                cfg.flow_batch_norm,
                seed=cfg.seed * 1000 + d,
            )
            for d in range(cfg.max_depth)
        )

    def _resize_flows(self, n: int) -> None:
        """Rebuild the (untrained) flows on ``n`` input channels, on the cascade's device, if they differ."""
        if len(self.flows) and self.flows[0].dim != n:
            self.flows = self._make_flows(n).to(self.thresholds.device)

    def get_extra_state(self) -> dict:
        return {"report": self.report}

    def set_extra_state(self, state: dict) -> None:
        self.report = dict(state.get("report", {}))

    # ------------------------------------------------------------------ inference

    def prepare(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.float()
        return F.normalize(x, dim=1) if self.cfg.normalize_features else x

    def flow_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) prepared features -> (N, D_flow) the live channels the flows model (all, by default)."""
        return x if bool(self.live_channels.all()) else x[:, self.live_channels]

    def score_stage(
        self, d: int, x: torch.Tensor, batch_size: int = 4096
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow d on (N, dim) prepared features: (N,) log p(x), (N,) hard cluster and (N, dim) latent, the latent
        zero on the channels the flows leave out (so z_source=flow_latent heads keep their (dim + C) inputs)."""
        s, c, u = self.flows[d].score(self.flow_input(x), batch_size)
        if u.shape[1] != self.dim:
            full = u.new_zeros(len(u), self.dim)
            full[:, self.live_channels] = u
            u = full
        return s, c, u

    @torch.no_grad()
    def cascade(self, feats: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) raw features -> (N,) stage index (0..D-1 a CAC, D the regular head) and (N, C) scores.

        Each sample is answered by the first stage whose likelihood reaches its threshold; the rest by the
        regular head. The flows always score in eval mode (batch norm with its running statistics), so a
        sample's route never depends on the rest of its batch.
        """
        modes = [f.training for f in self.flows]
        self.flows.eval()
        try:
            return self._cascade(feats, batch_size)
        finally:
            for f, m in zip(self.flows, modes, strict=True):
                f.train(m)

    def _cascade(self, feats: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prepare(feats)
        depth = len(self.flows)
        routes = torch.full((len(x),), depth, dtype=torch.long, device=x.device)
        scores = torch.zeros(len(x), self.num_classes, device=x.device)
        remaining = torch.arange(len(x), device=x.device)
        z_last = x
        for d in range(depth):
            if len(remaining) == 0:
                break
            xr = x[remaining]
            s, c, u = self.score_stage(d, xr, batch_size)
            take = s >= self.thresholds[d]
            z = u if self.cfg.z_source == "flow_latent" else xr
            if take.any():
                idx = remaining[take]
                routes[idx] = d
                scores[idx] = self.cacs[d](xr[take], z[take], self.cluster_priors[d][c[take]])
            remaining, z_last = remaining[~take], z[~take]
        if len(remaining):
            xr = x[remaining]
            scores[remaining] = self.regular(xr, z_last if self.cfg.z_source == "flow_latent" else xr)
        return routes, scores

    # ------------------------------------------------------------------ training

    def _select_channels(self, x: torch.Tensor) -> dict:
        """Set ``live_channels`` from the (N, dim) prepared training features and size the flows to them.

        ResNet-32 features are ReLU outputs averaged over space, and some channels are zero for every training
        image. A density on data with a zero-variance direction is degenerate: the likelihood grows without
        bound as the flow contracts that direction (each batch norm there divides by sqrt(eps) and adds
        -0.5 log(eps) ~ +5.8 nats, each MADE may add its largest log-scale), so those directions, not the
        structure of the live channels, dominate the likelihood; and a channel that is non-zero on a handful
        of images makes those images extreme outliers (on 3-epoch CIFAR features with 74 constant channels the
        kept flow's threshold was a log-likelihood of -8e5). With ``dead_channel_tol`` > 0, channels whose
        training variance is <= tol x the mean channel variance are left out of the flows (train and predict
        alike: ``flow_input``); the heads still see every channel (a constant one costs a linear head nothing).
        """
        cfg = self.cfg
        var = x.var(0, unbiased=False)  # (dim,)
        broadcast_from_main(var)  # DDP: every rank keeps rank 0's channels, so the flows' shapes agree
        zero = int((var <= 0).sum())
        if cfg.dead_channel_tol > 0:
            live = var > cfg.dead_channel_tol * var.mean()
        else:
            live = torch.ones_like(var, dtype=torch.bool)
        n_live = int(live.sum())
        if cfg.max_depth and n_live < 2:
            raise DataError(
                f"DLSA: only {n_live} of {self.dim} feature channels vary over the training set "
                f"(dead_channel_tol {cfg.dead_channel_tol}); a flow needs at least 2"
            )
        self.live_channels.copy_(live)
        self._resize_flows(n_live)
        dead = torch.nonzero(~live).squeeze(1).tolist()
        if dead:
            log.info(
                "DLSA: %d of %d feature channels left out of the flows (training variance <= %g x the mean "
                "channel variance %.3g; %d exactly constant): the flows model %d channels",
                len(dead),
                self.dim,
                cfg.dead_channel_tol,
                float(var.mean()),
                zero,
                n_live,
            )
        elif zero:
            log.warning(
                "DLSA: %d of %d feature channels are constant over the training set; the flows' batch norm "
                "sees zero variance there (set method.dead_channel_tol, e.g. 1e-3, to leave them out)",
                zero,
                self.dim,
            )
        return {
            "feature_dim": self.dim,
            "flow_dim": n_live,
            "dead_channels": len(dead),
            "dead_channel_ids": dead,
            "constant_channels": zero,
            "center_std": _r(resolve_center_std(cfg.center_std, n_live), 6) if cfg.max_depth else None,
        }

    def fit(
        self,
        feats: torch.Tensor,
        labels: torch.Tensor,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        stage1_head: nn.Linear | None = None,
    ) -> dict:
        """Train the whole cascade on (N, D) training features and (N,) labels; returns (and keeps as
        ``report``) a summary: the channels the flows model, and per stage the chosen flow lr and epoch with
        every candidate's purity, the threshold, the head's epoch and the share of each class's training
        samples the stage took (``train_class_fraction``, (C,), None for a class without training samples).

        ``val`` (features, labels) selects each head's epoch on the val samples routed to it; never test.
        ``stage1_head``: the stage-1 linear layer to initialise every head's Linear_x from (head_init=stage1).
        """
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        x, y = self.prepare(feats), labels.long().to(feats.device)
        xv = self.prepare(val[0]) if val is not None else None
        yv = val[1].long().to(feats.device) if val is not None else None
        if stage1_head is not None:
            self._init_from_stage1(stage1_head, feats, y)
        summary: dict[str, Any] = {**self._select_channels(x), "stages": []}
        n_class = torch.bincount(y, minlength=self.num_classes).tolist()

        def class_fraction(mask: torch.Tensor) -> list[float | None]:
            got = torch.bincount(y[mask], minlength=self.num_classes).tolist()
            return [round(g / n, 4) if n else None for g, n in zip(got, n_class, strict=True)]

        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        v_active = torch.ones(len(xv), dtype=torch.bool, device=x.device) if xv is not None else None
        z_all = x  # the latent of the last flow, for the regular head with z_source=flow_latent
        zv_all = xv
        for d, flow in enumerate(self.flows):
            n_act = int(active.sum())
            if n_act < 2:
                raise DataError(f"DLSA stage {d + 1}: only {n_act} training samples left; lower max_depth")
            flow_info = self._fit_flow(d, x[active], y[active], gen)
            flow.eval()
            s, c, u = self.score_stage(d, x)
            tau = torch.sort(s[active]).values[int(n_act * (1 - cfg.filter_fraction))]
            self.thresholds[d] = tau
            take = active & (s >= tau)
            # the cluster prior counts ALL training samples, not only the active ones (reference)
            joint, sizes, _ = cluster_purity(c, y, cfg.clusters, self.num_classes)
            self.cluster_priors[d] = joint.float() / sizes.clamp_min(1)[:, None]  # empty cluster: zero vector
            z = u if cfg.z_source == "flow_latent" else x
            counts = (
                torch.bincount(y[take], minlength=self.num_classes).float()
                if cfg.cac_prior == "subset"
                else self.train_counts.to(x.device)
            )
            val_sub = None
            if xv is not None:
                sv, cv, uv = self.score_stage(d, xv)
                v_take = v_active & (sv >= tau)
                zv = uv if cfg.z_source == "flow_latent" else xv
                val_sub = (xv[v_take], zv[v_take], self.cluster_priors[d][cv[v_take]], yv[v_take])
                v_active = v_active & ~v_take
                zv_all = zv
            head_info = self._train_head(
                self.cacs[d], (x[take], z[take], self.cluster_priors[d][c[take]]), y[take], counts, val_sub, gen
            )
            self.stage_train_counts[d] = int(take.sum())
            grid = flow_info.pop("flow_lr_grid")
            summary["stages"].append(
                {
                    "stage": d + 1,
                    "train_samples": int(take.sum()),
                    "threshold": float(tau),
                    **flow_info,
                    **head_info,
                    "train_class_fraction": class_fraction(take),
                    "flow_lr_grid": grid,
                }
            )
            log.info(
                "DLSA stage %d: flow lr %g epoch %s (%d pure clusters, purity %.3f), threshold %.3f, %d of %d train "
                "samples to CAC_%d%s",
                d + 1,
                flow_info["flow_lr"],
                flow_info["flow_epoch"],
                flow_info["pure_clusters"],
                flow_info["purity"],
                float(tau),
                int(take.sum()),
                n_act,
                d + 1,
                _val_text(head_info),
            )
            active = active & ~take
            z_all = z
        rest = active
        self.stage_train_counts[len(self.flows)] = int(rest.sum())
        counts = (
            torch.bincount(y[rest], minlength=self.num_classes).float()
            if cfg.regular_prior == "subset"
            else self.train_counts.to(x.device)
        )
        val_sub = None
        if xv is not None:
            val_sub = (xv[v_active], (zv_all if cfg.z_source == "flow_latent" else xv)[v_active], None, yv[v_active])
        zr = z_all if cfg.z_source == "flow_latent" else x
        head_info = self._train_head(self.regular, (x[rest], zr[rest], None), y[rest], counts, val_sub, gen)
        summary["stages"].append(
            {
                "stage": "regular",
                "train_samples": int(rest.sum()),
                **head_info,
                "train_class_fraction": class_fraction(rest),
            }
        )
        log.info("DLSA regular head: %d train samples%s", int(rest.sum()), _val_text(head_info))
        self.report = summary
        return summary

    def _init_from_stage1(self, head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Copy the stage-1 linear layer into every Linear_x, then check it reproduces the stage-1 predictions
        on the (prepared) training features: a mismatch (normalisation, label order) aborts (spec section 10)."""
        if head.weight.shape != (self.num_classes, self.dim) or head.bias is None:
            raise ConfigError(
                f"head_init=stage1 needs a stage-1 linear head with bias of shape "
                f"({self.num_classes}, {self.dim}); got {tuple(head.weight.shape)}, "
                f"bias {'present' if head.bias is not None else 'absent'} (model.head_bias=true)"
            )
        with torch.no_grad():
            for h in [*self.cacs, self.regular]:
                h.lin_x.weight.copy_(head.weight)
                h.lin_x.bias.copy_(head.bias)
            ref = (head(feats.float()).argmax(1) == labels).float().mean().item()
            ours = (self.regular.lin_x(self.prepare(feats)).argmax(1) == labels).float().mean().item()
        if abs(ref - ours) > 0.01:
            raise ConfigError(
                f"head_init=stage1: the copied head gives {100 * ours:.2f}% train accuracy on the "
                f"prepared features, the stage-1 model {100 * ref:.2f}%: check normalize_features"
            )

    def _fit_flow(self, d: int, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict:
        """Train flow d on the (N, dim) active training features once per ``flow_lr`` candidate and keep one.

        Every candidate starts from the same initial weights and draws the same pair stream (a copy of
        ``gen``), so they differ only in the learning rate. Kept: the candidate whose selected epoch (section
        4.3) has the most pure clusters, ties broken by the higher overall purity (share of samples in their
        cluster's majority class), then by the earlier candidate; an lr whose epochs never had their largest
        cluster below ``max_cluster_size`` ranks below every lr whose epochs did. A candidate whose loss or
        scores turn non-finite is skipped with a warning; if every one does, FloatingPointError. Training
        data only: the criterion is the one the reference uses to pick the flow's epoch.
        """
        lrs = self.cfg.flow_lrs
        flow = self.flows[d]
        xf = self.flow_input(x)
        many = len(lrs) > 1
        init = copy.deepcopy(flow.state_dict()) if many else None
        start = gen.get_state()
        rows: list[dict] = []
        best: tuple | None = None  # (key, row index, flow state, generator state)
        for lr in lrs:
            if init is not None:
                flow.load_state_dict(init)
            g = torch.Generator()
            g.set_state(start)
            try:
                info = self._train_flow(flow, xf, y, g, lr)
            except _FlowDiverged as e:
                if not many:
                    raise
                rows.append({"lr": lr, "diverged": True, "diverged_epoch": e.epoch, "epochs": e.history})
                log.warning(
                    "DLSA stage %d: flow lr %g diverged at epoch %d (%s); candidate skipped", d + 1, lr, e.epoch, e
                )
                continue
            rows.append({"lr": lr, "diverged": False, **info})
            key = (info["qualified"], info["pure_clusters"], info["purity"])
            if best is None or key > best[0]:
                best = (key, len(rows) - 1, copy.deepcopy(flow.state_dict()) if many else None, g.get_state())
            ep = info["epochs"]
            log.info(
                "DLSA stage %d: flow lr %g: epoch %d of %d kept, %d pure clusters, purity %.3f; train "
                "log-likelihood (median) %.4g -> %.4g, loss %.4g -> %.4g",
                d + 1,
                lr,
                info["flow_epoch"],
                len(ep["loss"]),
                info["pure_clusters"],
                info["purity"],
                ep["train_llh"][0],
                ep["train_llh"][-1],
                ep["loss"][0],
                ep["loss"][-1],
            )
        if best is None:
            raise TrainingError(
                f"DLSA stage {d + 1}: every flow_lr candidate diverged ([{', '.join(f'{v:g}' for v in lrs)}]): "
                f"lower them or set method.flow_grad_clip"
            )
        _, i, state, g_state = best
        if state is not None:
            flow.load_state_dict(state)
        gen.set_state(g_state)  # the heads draw on from the kept candidate's stream (one lr: as without a grid)
        chosen = rows[i]
        if many:
            log.info(
                "DLSA stage %d: flow lr %g chosen on training purity (%s)",
                d + 1,
                chosen["lr"],
                ", ".join(
                    f"{r['lr']:g}: diverged"
                    if r["diverged"]
                    else f"{r['lr']:g}: {r['pure_clusters']} pure, {r['purity']:.3f}"
                    for r in rows
                ),
            )
        return {
            "flow_lr": chosen["lr"],
            "flow_epoch": chosen["flow_epoch"],
            "pure_clusters": chosen["pure_clusters"],
            "purity": chosen["purity"],
            "flow_lr_grid": rows,
        }

    def _train_flow(self, flow: FlowGMM, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, lr: float) -> dict:
        """Three losses over class-balanced pairs (spec section 4) on (N, D_flow) flow inputs; keeps the epoch with
        the most pure clusters. Returns that epoch, its pure-cluster count and overall purity, whether any epoch
        met max_cluster_size (``qualified``), and per epoch the mean loss, the median training log-likelihood
        (eval mode), the pure-cluster count and the overall purity. Raises _FlowDiverged on a non-finite loss
        or training score."""
        cfg, k = self.cfg, self.cfg.clusters
        dev = x.device
        w = _class_weights(y, self.num_classes, cfg.weight_q).to(dev)
        order = torch.argsort(y, stable=True)
        counts = torch.bincount(y, minlength=self.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        present = torch.nonzero(counts > 0).squeeze(1)
        n_present = len(present)
        opt = torch.optim.SGD(flow.parameters(), lr=lr, momentum=0.0)
        ema = torch.zeros(k, device=dev)
        t = 0
        best: dict[str, Any] = {"pure_clusters": -1, "flow_epoch": None, "purity": 0.0, "state": None}
        steps = max(1, len(x) // cfg.flow_batch_size)
        bs = min(cfg.flow_batch_size, len(x))
        hist: dict[str, list] = {"loss": [], "train_llh": [], "pure_clusters": [], "purity": []}

        def draw(cls: torch.Tensor) -> torch.Tensor:
            off = (torch.rand(len(cls), generator=gen) * counts[cls].cpu()).long().to(dev)
            return x[order[starts[cls] + off]]

        for epoch in range(cfg.flow_epochs):
            flow.train()
            loss_sum = 0.0
            for _ in range(steps):
                ai = torch.randint(n_present, (bs,), generator=gen)
                a = present[ai.to(dev)]
                if n_present > 1:  # a different class, uniformly: shift by 1..P-1
                    b = present[((ai + torch.randint(1, n_present, (bs,), generator=gen)) % n_present).to(dev)]
                else:
                    b = a
                xp, xn = draw(a), draw(b)
                lp, _ = flow.component_log_probs(torch.cat([xp, xn]))  # one pass: batch norm sees both
                lp_p, lp_n = lp[:bs], lp[bs:]
                logp = lp_p.logsumexp(1) - math.log(k)  # (B,) log p(x+)
                loss_lh = -cfg.lambda_lh * (w[a] * logp).mean()
                q_p = lp_p.softmax(1)  # (B, K)
                loss_pur = (
                    cfg.lambda_pur * (q_p.detach() * lp_n.log_softmax(1)).sum(1).mean()
                    if n_present > 1
                    else lp.new_zeros(())
                )
                t += 1
                ema = cfg.posterior_momentum * ema.detach() + (1 - cfg.posterior_momentum) * (q_p.mean(0) + 1e-7)
                p_hat = ema / (1 - cfg.posterior_momentum**t)
                loss_bal = cfg.lambda_bal * ((p_hat * p_hat.log()).sum() + math.log(k))
                loss = loss_lh + loss_pur + loss_bal
                if not torch.isfinite(loss):
                    raise _FlowDiverged(
                        f"DLSA flow loss is {loss.item()} at epoch {epoch + 1}: lower "
                        f"method.flow_lr ({lr:g}) or set method.flow_grad_clip",
                        epoch + 1,
                        hist,
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.flow_grad_clip > 0:
                    nn.utils.clip_grad_norm_(flow.parameters(), cfg.flow_grad_clip)
                opt.step()
                loss_sum += loss.item()
            flow.eval()
            s, c, _ = flow.score(x)
            if not torch.isfinite(s).all():
                raise _FlowDiverged(
                    f"DLSA flow gives non-finite training log-likelihoods after epoch {epoch + 1}: lower "
                    f"method.flow_lr ({lr:g}) or set method.flow_grad_clip",
                    epoch + 1,
                    hist,
                )
            joint, sizes, purity = cluster_purity(c, y, k, self.num_classes)
            pure = int(((purity > cfg.min_purity) & (sizes > cfg.min_size)).sum())
            overall = float(joint.max(1).values.sum()) / len(y)  # share of samples in their cluster's majority
            hist["loss"].append(_r(loss_sum / steps))
            hist["train_llh"].append(_r(float(s.median())))  # median: a few outliers can dominate the mean
            hist["pure_clusters"].append(pure)
            hist["purity"].append(round(overall, 4))
            if int(sizes.max()) < cfg.max_cluster_size and pure > best["pure_clusters"]:
                best = {
                    "pure_clusters": pure,
                    "flow_epoch": epoch + 1,
                    "purity": round(overall, 4),
                    "state": copy.deepcopy(flow.state_dict()),
                }
        qualified = best["state"] is not None
        if not qualified:
            log.warning(
                "DLSA: no flow epoch had its largest cluster below max_cluster_size=%d; keeping the last epoch",
                cfg.max_cluster_size,
            )
            best = {"pure_clusters": pure, "flow_epoch": cfg.flow_epochs, "purity": round(overall, 4)}
        else:
            flow.load_state_dict(best["state"])
        return {
            "flow_epoch": best["flow_epoch"],
            "pure_clusters": best["pure_clusters"],
            "purity": best["purity"],
            "qualified": qualified,
            "epochs": hist,
        }

    def _train_head(
        self,
        head: nn.Module,
        inputs: tuple,
        y: torch.Tensor,
        counts: torch.Tensor,
        val: tuple | None,
        gen: torch.Generator,
    ) -> dict:
        """Balanced Softmax CE(logits + log(n_c + 1e-6), y), SGD momentum 0, constant lr; the epoch is chosen on
        the val samples routed to this head (head_select=auto with a val split) or is the last one."""
        cfg = self.cfg
        n = len(y)
        if n == 0:
            return {"head_epoch": None}
        log_prior = torch.log(counts.float().to(y.device) + 1e-6)
        opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr, momentum=0.0)
        use_val = cfg.head_select == "auto" and val is not None and len(val[-1]) > 0
        best: dict[str, Any] = {"head_epoch": cfg.head_epochs, "val_top1": None}
        best_state = None

        def val_acc() -> float:
            with torch.no_grad():
                return (head(*val[:3]).argmax(1) == val[3]).float().mean().item() * 100

        for epoch in range(cfg.head_epochs):
            perm = torch.randperm(n, generator=gen).to(y.device)
            for i in range(0, n, cfg.head_batch_size):
                idx = perm[i : i + cfg.head_batch_size]
                logits = head(*(t[idx] if t is not None else None for t in inputs))
                loss = F.cross_entropy(logits + log_prior, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            last = epoch + 1 == cfg.head_epochs
            if use_val and ((epoch + 1) % cfg.eval_every == 0 or last):
                acc = val_acc()
                if best["val_top1"] is None or acc > best["val_top1"]:
                    best = {"head_epoch": epoch + 1, "val_top1": acc}
                    best_state = copy.deepcopy(head.state_dict())
        if best_state is not None:
            head.load_state_dict(best_state)
        return best


def _val_text(info: dict) -> str:
    if info.get("val_top1") is None:
        return f" (head: epoch {info.get('head_epoch')})"
    return f" (head: epoch {info['head_epoch']} by val top1 {info['val_top1']:.2f} on its routed val samples)"


# ----------------------------------------------------------------------------- the method


@METHODS.register("dlsa")
class DLSA(_FrozenBackbone):
    """DLSA: flow-filter cascade with cluster-aided Balanced-Softmax classifiers on frozen features (stage 2)."""

    requires_head = None  # any stage-1 head: DLSA uses only the backbone's features (head_init=stage1: linear)
    trains = False  # a stage of epochs 0: flows and heads train inside on_stage_start, on extracted features
    Config = DLSAConfig

    def __init__(self, model: Classifier, cfg: DLSAConfig, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        # forward() stays the base one (the stage-1 model's CE) for the Method contract; the fit loop never
        # steps it (a dlsa stage has epochs 0 and no parameter groups), so the stage-1 head is left as it was.
        dev = next(model.backbone.parameters()).device
        self.cascade = DLSACascade(model.feature_dim, ctx.num_classes, cfg, ctx.train_counts).to(dev)

    def param_groups(self) -> list[ParamGroup]:
        return []  # trained inside on_stage_start, on features

    def on_stage_start(self, ctx: MethodContext) -> None:
        if ctx.epochs != 0:
            raise ConfigError(
                f"a dlsa stage trains on extracted features inside the stage: set its epochs to 0 "
                f"(got {ctx.epochs}); its own epochs are method.flow_epochs and method.head_epochs"
            )
        if ctx.stage is not None and ctx.stage.init_from is None:
            raise ConfigError(
                "a dlsa stage works on a trained stage-1 backbone: set its init_from (an earlier stage, "
                "or a stage-1 run folder / checkpoint)"
            )
        loader = ctx.loader
        feats, labels = self.split_features(loader, "train")
        val = None
        if self.cfg.head_select == "auto" and "val" in loader.ds.splits:
            val = self.split_features(loader, "val")
        stage1 = None
        if self.cfg.head_init == "stage1":
            if not isinstance(self.model.head, LinearHead):
                raise ConfigError("head_init=stage1 needs a stage-1 linear head (model.head=linear)")
            stage1 = self.model.head.fc
        log.info(
            "DLSA: %d train features of dim %d%s",
            len(feats),
            feats.shape[1],
            f", {len(val[0])} val" if val is not None else ", no val split: heads keep their last epoch",
        )
        self.summary = self.cascade.fit(feats, labels, val, stage1)
        broadcast_from_main(self.cascade)  # DDP: every rank fitted on all features; keep rank 0's cascade
        self.cascade.report = self.summary = object_from_main(self.summary)  # ...and the report that describes it

    def report(self) -> dict:
        """The cascade's fit summary (saved with the weights): dead channels, per stage the chosen flow lr and
        epoch with every candidate's training purity, and the share of each class's training samples taken."""
        return self.cascade.report

    @property
    def route_names(self) -> list[str]:
        return [f"CAC_{d + 1}" for d in range(self.cfg.max_depth)] + ["regular"]

    @torch.no_grad()
    def routes(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,) the stage that answers each sample: 0..D-1 a cluster-aided classifier, D the regular one."""
        return self.cascade.cascade(feats)[0]

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.cascade.cascade(feats)[1]

    def inference_module(self) -> nn.Module:
        return DenseCascade(self.model, self.cascade)


class DenseCascade(nn.Module):
    """DLSA's prediction for export: (B, 3, H, W) normalised images -> (B, C) scores equal to ``cascade``'s.

    ``cascade`` scores each stage on the samples earlier stages left, so its shapes follow the data and a trace
    would fix one batch's routing. Here every stage scores every sample and ``torch.where`` keeps, per sample, the
    first stage whose likelihood reaches its threshold, else the regular head: the same answer, because the flows
    score in eval mode (batch norm with running statistics), each sample on its own.
    """

    def __init__(self, model: Classifier, cascade: DLSACascade) -> None:
        super().__init__()
        # The cascade's parts, not the cascade: its extra state (the fit report) is no tensor, which exporters refuse.
        self.model, self.flows, self.cacs, self.regular = model, cascade.flows, cascade.cacs, cascade.regular
        self.register_buffer("thresholds", cascade.thresholds.clone(), persistent=False)  # (depth,)
        self.register_buffer("cluster_priors", cascade.cluster_priors.clone(), persistent=False)  # (depth, K, C)
        live = cascade.live_channels
        self.all_live = bool(live.all())  # fixed at export: the flows' input channels
        self.register_buffer("live_index", torch.nonzero(live).flatten(), persistent=False)  # (D_flow,)
        self.normalize, self.latent = cascade.cfg.normalize_features, cascade.cfg.z_source == "flow_latent"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(images).float()  # (B, dim), as DLSACascade.prepare
        x = F.normalize(x, dim=1) if self.normalize else x
        xf = x if self.all_live else x.index_select(1, self.live_index)  # (B, D_flow)
        z_last, stages = x, []
        for d, flow in enumerate(self.flows):
            lp, u = flow.component_log_probs(xf)  # (B, K), (B, D_flow)
            score = lp.logsumexp(1) - math.log(flow.clusters)  # (B,)
            if not self.all_live:  # the latent on every channel, zero where the flows do not look
                u = x.new_zeros(x.shape).index_copy(1, self.live_index, u)
            z = u if self.latent else x
            prior = self.cluster_priors[d][lp.argmax(1)]  # (B, C) the hard cluster's class histogram
            stages.append((score >= self.thresholds[d], self.cacs[d](x, z, prior)))
            z_last = z
        out = self.regular(x, z_last if self.latent else x)  # (B, C) for samples no stage took
        for take, scores in reversed(stages):  # earlier stages win
            out = torch.where(take[:, None], scores, out)
        return out


# ----------------------------------------------------------------------------- feature evaluation (section 8)


def evaluate_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    thresholds: Any = None,
    cfg: DLSAConfig | None = None,
) -> dict:
    """Head-tail separability of a feature set (OUR interpretation of the paper's feature evaluation, spec
    section 8; the paper's protocol was not available): one flow filter (depth 1) on the training features,
    then

    1. cluster purity on train: clusters with purity > 0.9 / 0.7 / 0.5, size quartiles, empty clusters;
    2. the many / medium / few composition of the filtered 30 % (train and test) against the whole split;
    3. accuracy (top1, many / medium / few, MCC, NMI) of the CAC on its filtered test subset and of the
       regular classifier on the rest.

    Features that separate head from tail well give purer clusters and a filtered subset the CAC classifies
    accurately. Heads are kept at their last epoch (no test-based selection).
    """
    from sklearn.metrics import matthews_corrcoef, normalized_mutual_info_score

    from longtail.evaluation.metrics import ShotThresholds, classification_metrics

    thresholds = thresholds or ShotThresholds()
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    counts = torch.bincount(train_labels.cpu(), minlength=num_classes)
    cfg = replace(cfg or DLSAConfig(), max_depth=1, head_select="last")
    casc = DLSACascade(train_feats.shape[1], num_classes, cfg, counts).to(train_feats.device)
    summary = casc.fit(train_feats, train_labels)
    casc.eval()
    s_tr, c_tr, _ = casc.score_stage(0, casc.prepare(train_feats))
    _, sizes, purity = cluster_purity(c_tr, train_labels.to(c_tr.device), cfg.clusters, num_classes)
    nonempty = sizes > 0
    q = torch.quantile(sizes[nonempty].double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    groups = thresholds.groups(counts)  # name -> (C,) bool

    def composition(labels: torch.Tensor) -> dict:
        lab = labels.cpu()
        return {g: round(100 * float(m[lab].double().mean()), 2) if len(lab) else None for g, m in groups.items()}

    routes, scores = casc.cascade(test_feats)
    routes, preds, tl = routes.cpu(), scores.argmax(1).cpu(), test_labels.cpu()
    taken_tr = (s_tr >= casc.thresholds[0]).cpu()

    def subset_metrics(mask: torch.Tensor) -> dict:
        if not mask.any():
            return {"num_samples": 0}
        m = classification_metrics(preds[mask], tl[mask], counts, thresholds)
        return {
            "num_samples": int(mask.sum()),
            **{k: m[k] for k in ("top1", "many", "medium", "few")},
            "mcc": round(100 * float(matthews_corrcoef(tl[mask], preds[mask])), 2),
            "nmi": round(100 * float(normalized_mutual_info_score(tl[mask], preds[mask])), 2),
        }

    return {
        "protocol": "our interpretation of DLSA's feature evaluation (spec dlsa.md section 8): one flow filter, "
        f"{cfg.clusters} clusters, filter_fraction {cfg.filter_fraction}",
        "clusters": {
            "purity_gt_0.9": int((purity[nonempty] > 0.9).sum()),
            "purity_gt_0.7": int((purity[nonempty] > 0.7).sum()),
            "purity_gt_0.5": int((purity[nonempty] > 0.5).sum()),
            "empty": int((~nonempty).sum()),
            "size_quartiles": [round(v, 1) for v in q],
        },
        "composition": {
            "train_all": composition(train_labels),
            "train_filtered": composition(train_labels[taken_tr]),
            "test_all": composition(tl),
            "test_filtered": composition(tl[routes == 0]),
        },
        "filtered": subset_metrics(routes == 0),
        "rest": subset_metrics(routes == 1),
        "all": subset_metrics(torch.ones_like(routes, dtype=torch.bool)),
        "flow_epoch": summary["stages"][0]["flow_epoch"],
        "flow_lr": summary["stages"][0]["flow_lr"],
        "dead_channels": summary["dead_channels"],
        "thresholds": thresholds.describe(),
        "options": asdict(cfg),  # as used: max_depth 1, heads at their last epoch
    }


__all__ = ["DLSA", "DLSAConfig", "DLSACascade", "FlowGMM", "BatchNormFlow", "evaluate_features", "resolve_center_std"]


@FEATURE_EVALUATIONS.register("flow_filter")
class FlowFilterEvaluation:
    """Head/tail separability of a run's features: one DLSA flow filter fitted on its training features."""

    Config = DLSAConfig  # the options of the filter (a dlsa run's own, when the run being measured is one)
    evaluate = staticmethod(evaluate_features)
