"""Classifier heads: ``(B, D) features -> (B, C) logits``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.config import ConfigError, options
from longtail.registry import HEADS


class LinearHead(nn.Module):
    """z = W x (+ b). TDE's and GLT's CE baseline is bias-free; Decoupling's joint model has a bias."""

    def __init__(self, in_dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.fc.weight  # (C, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class CosineHead(nn.Module):
    """z_c = s * cos(x, w_c): unit features against unit class weights, no bias."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))  # (C, D)
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eps inside normalize: a zero feature gives zero logits, never NaN.
        return self.scale * F.normalize(x, dim=1, eps=1e-12) @ F.normalize(self.weight, dim=1, eps=1e-12).T


def _chunks(t: torch.Tensor, k: int) -> torch.Tensor:
    """(..., D) -> (..., K, D/K): the K contiguous channel chunks of the causal-norm heads."""
    if t.shape[-1] % k:
        raise ValueError(f"feature dim {t.shape[-1]} is not divisible by num_heads={k}")
    return t.unflatten(-1, (k, t.shape[-1] // k))


def causal_norm_logits(f: torch.Tensor, weight: torch.Tensor, k: int, tau: float, gamma: float,
                       eps: float = 1e-12) -> torch.Tensor:
    """De-confound logits (TDE paper Eq. 7): (tau/K) sum_k w_i^k . x^k / ((||w_i^k|| + gamma) ||x^k||).

    f: (B, D) features; weight: (C, D). Returns (B, C). The eps keeps a zero feature chunk finite
    (the reference code has none: TDE defect D3).
    """
    xk = _chunks(f, k)
    xk = xk / (xk.norm(dim=-1, keepdim=True) + eps)  # (B, K, D/K) unit per head
    wk = _chunks(weight, k)
    wk = wk / (wk.norm(dim=-1, keepdim=True) + gamma)  # (C, K, D/K) damped per class and head
    return (tau / k) * torch.einsum("bkd,ckd->bc", xk, wk)


def tde_logits(f: torch.Tensor, weight: torch.Tensor, direction: torch.Tensor, alpha: float, k: int, tau: float,
               gamma: float, eps: float = 1e-12) -> torch.Tensor:
    """Counterfactual TDE logits (TDE paper Eq. 8): remove alpha times each unit feature's projection on the
    head direction, per head, before the damped classifier. alpha = 0 gives ``causal_norm_logits``.

    f: (B, D); weight: (C, D); direction: (D,) the moving average of features (only its direction is used).
    """
    xk = _chunks(f, k)
    xk = xk / (xk.norm(dim=-1, keepdim=True) + eps)  # (B, K, D/K)
    dk = _chunks(direction, k)
    dk = dk / (dk.norm(dim=-1, keepdim=True) + eps)  # (K, D/K) unit head direction per head
    cos = torch.einsum("bkd,kd->bk", xk, dk)  # (B, K)
    wk = _chunks(weight, k)
    wk = wk / (wk.norm(dim=-1, keepdim=True) + gamma)  # (C, K, D/K)
    return (tau / k) * torch.einsum("bkd,ckd->bc", xk - alpha * cos[..., None] * dk, wk)


class CausalNormHead(nn.Module):
    """The De-confound classifier: K-head, norm-damped cosine classifier, no bias (TDE paper Eq. 7).

    Defaults K=2, tau=16, gamma=1/32; W initialised U(-1/sqrt(D), 1/sqrt(D)) as in the reference code.
    """

    def __init__(self, in_dim: int, num_classes: int, num_heads: int = 2, tau: float = 16.0,
                 gamma: float = 1 / 32) -> None:
        super().__init__()
        if in_dim % num_heads:
            raise ConfigError(f"causal_norm head: feature dim {in_dim} is not divisible by num_heads={num_heads}; "
                              f"set model.head.num_heads to a divisor of {in_dim}")
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))  # (C, D)
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim))
        self.num_heads, self.tau, self.gamma = num_heads, tau, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return causal_norm_logits(x, self.weight, self.num_heads, self.tau, self.gamma)

    def tde(self, x: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
        return tde_logits(x, self.weight, direction, alpha, self.num_heads, self.tau, self.gamma)


# Each head's own options (``model.head: {name: HEAD, OPTION: VALUE}``, ``longtail list HEAD``): checked against
# these dataclasses by ``longtail.engine.build``, which stores them in the run's config.yaml with every default.


@dataclass
class LinearHeadConfig:
    """Options of the ``linear`` head."""

    # z = W x + b with a bias per class; false: z = W x (TDE's and GLT's CE "Baseline" is bias-free, Decoupling's
    # joint model has a bias).
    bias: bool = True


@dataclass
class CosineHeadConfig:
    """Options of the ``cosine`` head."""

    scale: float = 16.0  # s in z_c = s * cos(x, w_c): the logits' range [-s, s] (LDAM-DRW's recipes: 30)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale (s) must be > 0, got {self.scale}")


@dataclass
class CausalNormHeadConfig:
    """Options of the ``causal_norm`` head: z_i = (tau/K) sum_k w_i^k . x^k / ((||w_i^k|| + gamma) ||x^k||)."""

    tau: float = 16.0  # tau: the logit scale, split as tau / K over the K heads
    num_heads: int = 2  # K heads, each a contiguous D/K chunk of the feature (D must be divisible by K)
    gamma: float = 0.03125  # gamma in w / (||w|| + gamma): damps the weight norm (1/32 in the TDE code)

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")


@HEADS.register("linear")
@options(LinearHeadConfig)
def linear(in_dim: int, num_classes: int, cfg: LinearHeadConfig) -> nn.Module:
    """Linear classifier z = W x + b (model.head.bias: false drops b)."""
    return LinearHead(in_dim, num_classes, bias=cfg.bias)


@HEADS.register("cosine")
@options(CosineHeadConfig)
def cosine(in_dim: int, num_classes: int, cfg: CosineHeadConfig) -> nn.Module:
    """Cosine classifier z_c = s * cos(x, w_c), s = model.head.scale."""
    return CosineHead(in_dim, num_classes, scale=cfg.scale)


@HEADS.register("causal_norm")
@options(CausalNormHeadConfig)
def causal_norm(in_dim: int, num_classes: int, cfg: CausalNormHeadConfig) -> nn.Module:
    """De-confound (TDE) classifier: K = model.head.num_heads heads, scale model.head.tau, damping model.head.gamma."""
    return CausalNormHead(in_dim, num_classes, cfg.num_heads, cfg.tau, cfg.gamma)
