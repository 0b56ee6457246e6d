"""DLSA's options (``DLSAConfig``, the ``method:`` block of a dlsa stage) and the scale of the mixture means."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    # Which flow epoch (and flow_lr) is kept: pure_clusters (the reference's R: most clusters purer than min_purity
    # and larger than min_size) | purity (the highest share of samples in their cluster's majority class; R can
    # fall while purity rises, when the purity loss merges clusters) | last (the last epoch)
    flow_select: str = "pure_clusters"
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
            "flow_select": ("pure_clusters", "purity", "last"),
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
