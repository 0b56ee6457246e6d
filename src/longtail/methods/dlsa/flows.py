"""DLSA's flow filter: a masked autoregressive flow with batch norm (``zuko``, an optional dependency) onto a
Gaussian mixture with fixed random means (spec dlsa.md sections 3-4)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


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
