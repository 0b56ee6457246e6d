"""The re-balancing losses as pure functions of (B, C) logits, (B,) targets and per-class constants (spec
baselines.md section 2). No state, no registry: the loss modules (``longtail.losses.modules``) and methods call them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017): -(1 - p_y)^gamma log p_y, optionally class-weighted (w_y).

    reduction: mean (plain mean over the batch) or weighted_mean (sum w_y l / sum w_y, PyTorch's convention).
    """
    logp = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)  # (B,)
    loss = -((1 - logp.exp()) ** gamma) * logp
    return _reduce(loss, targets, weight, reduction)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 1.0,
                       weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Sigmoid (one-vs-all) focal loss as Cui et al.'s class-balanced code computes it: every class c a binary
    problem with p_c = sigmoid(z_c), l_i = sum_c -(1 - p_t)^gamma log p_t (p_t = p_c for the true class, 1 - p_c for
    the others); gamma = 0 is sigmoid cross-entropy. A class weight w_{y_i} scales all C terms of sample i.

    reduction: mean (sum over the batch / B, the reference's "normalise by the number of positives", one per
    sample) or weighted_mean (sum w_y l / sum w_y). The modulator is the reference's stable form,
    exp(-gamma (t z + log(1 + e^-z))), t the (B, C) one-hot targets.
    """
    z = logits.float()
    t = F.one_hot(targets, z.shape[1]).to(z.dtype)  # (B, C)
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")  # (B, C)
    if gamma:
        bce = torch.exp(-gamma * (t * z + F.softplus(-z))) * bce
    return _reduce(bce.sum(1), targets, weight, reduction)


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


def posthoc_adjusted(scores: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021) of (B, C) scores: z - tau log pi, pi = counts / sum(counts)
    (``counts`` float, (C,)), with pi^tau + 1e-12 inside the log as in the LA code."""
    prior = counts / counts.sum()
    return scores - torch.log(prior**tau + 1e-12)


def ldam_margins(counts: torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM (Cao et al. 2019): Delta_c = K / n_c^(1/4), K chosen so that the largest margin is max_margin."""
    m = 1.0 / counts.float().clamp_min(1) ** 0.25
    return m * (max_margin / m.max())


def ldam_loss(logits: torch.Tensor, targets: torch.Tensor, margins: torch.Tensor, scale: float,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """LDAM's loss on a cosine head's (B, C) logits z = s cos: CE(z - s Delta_y on the true class, y), optionally
    class-weighted (deferred re-weighting)."""
    onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    z = logits - scale * margins[targets][:, None] * onehot
    return F.cross_entropy(z, targets, weight=weight)
