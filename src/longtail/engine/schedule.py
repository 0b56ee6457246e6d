"""Learning rate as a pure function of (fractional) epoch: warm-up, then multistep or cosine; and the optimiser's
parameter groups of a method's typed ``ParamGroup``s (which follow the schedule, which keep an lr of their own)."""

from __future__ import annotations

import math

from longtail.config import ScheduleConfig
from longtail.errors import ConfigError
from longtail.methods.base import ParamGroup

# The optimiser-group key that marks a group with a constant lr of its own (``ParamGroup.lr``): ``set_lr`` leaves it.
# It is the key methods once wrote themselves, so the optimiser state of checkpoints written before ParamGroup
# existed (IFL's centres) resumes unchanged, and so does the state written now.
CONSTANT_LR = "fixed_lr"


def optimizer_groups(groups: list[ParamGroup], where: str) -> list[dict]:
    """The ``torch.optim`` parameter-group dicts of a method's ``param_groups()``: a setting a group leaves None is
    the optimiser's default (the stage's ``optim``), and a group with an lr of its own is marked ``CONSTANT_LR``."""
    out = []
    for g in groups:
        if not isinstance(g, ParamGroup):
            raise ConfigError(f"{where}: param_groups() returned a {type(g).__name__}, not a ParamGroup (the Method "
                              f"contract changed: return longtail.methods.base.ParamGroup(params, lr=...), whose lr "
                              f"is constant, instead of dicts with fixed_lr / lr_scale)")
        d: dict = {"params": list(g.params)}
        if not g.scheduled:
            d["lr"] = g.lr
            d[CONSTANT_LR] = True
        for key in ("momentum", "weight_decay", "nesterov"):
            if getattr(g, key) is not None:
                d[key] = getattr(g, key)
        out.append(d)
    return out


def follows_schedule(group: dict) -> bool:
    """Whether an optimiser group's lr is the stage's scheduled one (not a ``ParamGroup`` lr of its own)."""
    return not group.get(CONSTANT_LR, False)


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
