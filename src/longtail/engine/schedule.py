"""Learning rate as a pure function of (fractional) epoch: warm-up, then multistep or cosine."""

from __future__ import annotations

import math

from longtail.config import ScheduleConfig


def lr_at(base_lr: float, cfg: ScheduleConfig, epochs: int, t: float) -> float:
    """Learning rate at time ``t`` (0-based epochs, fractional when updated per iteration).

    warm-up (t < W):  factor = warmup_factor + (1 - warmup_factor) * t / W
    multistep:        base * gamma ** #(milestones <= t)
    cosine:           min + (base - min) * (1 + cos(pi * (t - W) / (T - W))) / 2

    ``reference_offset`` reproduces the TDE / Decoupling code, whose scheduler is stepped at the start
    of each epoch: 0-based epoch e then trains at the value for e + 1 (spec tde.md section 6: CIFAR
    epoch 1 at 0.0933, epochs 120-159 at 0.002; ImageNet-LT's last epoch at lr 0).
    """
    if cfg.reference_offset:
        t = t + 1
    w = cfg.warmup_epochs
    if cfg.name == "cosine":
        if t < w:
            lr = base_lr
        else:
            span = max(epochs - w, 1)
            lr = cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t - w, span) / span))
    elif cfg.name == "multistep":
        lr = base_lr * cfg.gamma ** sum(1 for m in cfg.milestones if t >= m)
    else:
        lr = base_lr
    if t < w:
        lr *= cfg.warmup_factor + (1 - cfg.warmup_factor) * t / w
    return lr
