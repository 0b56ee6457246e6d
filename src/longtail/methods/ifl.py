"""Invariant Feature Learning (Tang et al., ECCV 2022; spec glt_ifl.md 5-6) as a plug-in around a registered loss.

Two training environments resample the same training set: env1 the natural distribution, env2 class-balanced
with hard samples up-weighted (``intra_weights``), rebuilt from the ground-truth confidences recorded during the
rebuild epochs. Every batch is half env1, half env2 in ONE forward pass. Class centres shared by both
environments pull each feature towards its class centre (the "IRM version of the centre loss"):

    L = L_cls(logits, y) + a(epoch) * mean_i ||z_i - C[y_i]||^2

and the centres move by their own plain SGD step (lr ``center_lr``) on the unweighted centre loss, i.e. a
per-batch moving average C_c <- C_c + (2 lr / B) sum_{y_i = c} (z_i - C_c); while a = 0 they stay put (the
reference: centres keep their random init until the first centre milestone).

The reference's combinations are options of this one plug-in: ``base`` + ``base_options`` (the loss and its own
settings: Baseline / BLSoftmax / Logit-Adj / LDAM + IFL), ``center_loss: cosine`` (1 - cos(z, C_y), what its
``center_LDAM_dual`` and ``center_ride`` use), ``mixup_alpha`` (Mixup + IFL, ``center_dual_mixup``); RandAugment
+ IFL is a data option (``data.augment: glt+randaugment``), cRT / LWS + IFL a second stage (``init_from``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

from longtail.config import from_dict, to_dict
from longtail.data.base import LTDataset
from longtail.data.samplers import Sampler
from longtail.errors import ConfigError
from longtail.losses import create_loss
from longtail.methods.base import BatchInfo, MethodContext, ParamGroup, TrainsWithLoss, decay_groups, why_not_a_loss
from longtail.models import Classifier
from longtail.registry import LOSSES, METHODS


def intra_weights(scores: torch.Tensor, targets: torch.Tensor, recorded: torch.Tensor, num_classes: int,
                  sample_scale: float = 4.0) -> torch.Tensor:
    """env2 sampling weights (N,): each class sums to 1, inside a class mass grows with hardness.

    ``scores`` (N,) ground-truth-class probabilities p, ``recorded`` (N,) bool: sampled in the scoring epoch
    (others get weight 0, as the reference). Per class with >= 5 recorded samples: p~ = min-max normalised p,
    u = |1 - p~| + 1e-5, k = clamp(log(s) / log(mean of the top-20% u / mean of the bottom-80% u), 1, 10),
    w = u^k / sum u^k; so the hardest fifth weighs about ``sample_scale`` times the easiest four fifths. The means
    are over the int(0.8 n) smallest and the int(0.2 n) largest u, as the reference's ``generate_intra_weight``.
    """
    w = torch.zeros(len(targets), dtype=torch.float64)
    scores = scores.double()
    for c in range(num_classes):
        idx = ((targets == c) & recorded).nonzero().flatten()
        if len(idx) == 0:
            continue
        if len(idx) < 5:
            w[idx] = 1.0 / len(idx)
            continue
        p = scores[idx]
        p = (p - p.min()) / (p.max() - p.min() + 1e-9)
        u = (1 - p).abs() + 1e-5
        s = u.sort().values
        cut = int(len(s) * 0.8)
        # The reference's torch.topk: the int(0.8 n) smallest and the int(0.2 n) largest (they overlap or leave a
        # gap when 0.8 n is not an integer).
        head, tail = s[:cut].mean(), s[len(s) - int(len(s) * 0.2):].mean()
        k = float((math.log(sample_scale) / torch.log(tail / head + 1e-5)).clamp(1, 10))
        uk = u**k + 1e-12
        w[idx] = uk / uk.sum()
    return w.float()


class EnvironmentSampler(Sampler):
    """Each global batch: ``half`` draws from env1 then ``half`` from env2, with replacement by their weights.

    An epoch is ceil(N / half) batches (2N draws, as the reference). With DDP the strided shard gives every
    rank a local batch that is still half env1, half env2 (when half divides by the world size).
    """

    def __init__(self, targets: torch.Tensor, num_classes: int, seed: int, total_epochs: int,
                 weights: torch.Tensor, half: int) -> None:
        super().__init__(targets, num_classes, seed, total_epochs)
        self.weights = weights  # (2, N) the method's buffer, read at each epoch's draw (rebuilt in place)
        self.half = half

    def __len__(self) -> int:
        return -(-len(self.targets) // self.half) * 2 * self.half

    def indices(self, epoch: int) -> torch.Tensor:
        g = self.generator(epoch)
        iters = -(-len(self.targets) // self.half)
        draws = [torch.multinomial(self.weights[e].double().cpu(), iters * self.half, replacement=True,
                                   generator=g).view(iters, self.half) for e in range(2)]
        return torch.cat(draws, dim=1).flatten()  # (iters * 2 half,) [env1 half | env2 half] per batch


_SAMPLE_BUFFERS = ("env_weights", "record_score", "record_pos")  # sized by the training set


def _size_sample_buffers(module: IFL, state_dict: dict, prefix: str, *_) -> None:
    """Load-state-dict pre-hook: an IFL built without its training set (a finished run loaded for prediction,
    which never reads the data) has empty per-sample buffers; take their size from the checkpoint. One built with
    a training set keeps its size, so a checkpoint of another training set is still refused."""
    if len(module.train_targets):
        return
    for name in _SAMPLE_BUFFERS:
        saved, own = state_dict.get(prefix + name), getattr(module, name)
        if isinstance(saved, torch.Tensor) and saved.shape != own.shape:
            setattr(module, name, torch.empty(saved.shape, dtype=own.dtype, device=own.device))


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module):
    """Batch norm layers normalise by the batch's statistics but leave their running statistics (and batch
    counters) as they were: momentum 0 for the duration, counters restored."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


@METHODS.register("ifl")
class IFL(TrainsWithLoss):
    """IFL around the registered loss ``base`` (Balanced Softmax by default, as the paper's ``center_dual``).

    Milestones are fractions of the stage (the paper's epochs 60 and 80 of 100 -> 0.6, 0.8), so a recipe of
    any length keeps the schedule: centre weight ``center_weights[j]`` from milestone j on (weight [0] before
    the first), env2 rebuilt at the end of each ``update_milestones`` epoch from that epoch's confidences.
    """

    @dataclass
    class Config:
        base: str = "balanced_softmax"  # the classification loss L_cls: a registered loss (longtail.losses: ce, ...)
        # The base's own options, checked against its Config (e.g. ldam_drw: {drw_epoch: 80} in a 100-epoch stage).
        base_options: dict[str, Any] = field(default_factory=dict)
        center_milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])
        center_weights: list[float] = field(default_factory=lambda: [0.0, 0.001, 0.005])
        update_milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])
        center_lr: float = 0.5  # plain SGD on the centres, no momentum / decay / schedule
        sample_scale: float = 4.0  # env2: hardest fifth about this many times the easiest four fifths
        center_loss: str = "l2"  # l2: ||z - C_y||^2 (center_dual) | cosine: 1 - cos(z, C_y) (center_LDAM_dual)
        # > 0: Mixup + IFL (center_dual_mixup): the two-environment batch mixed with lam ~ Beta(a, a), L_cls and the
        # centre loss mixed as lam * L(y) + (1 - lam) * L(y[perm]); 0: no mixing.
        mixup_alpha: float = 0.0
        # Batch norm per environment half, as the reference's 2-GPU DataParallel ran it (spec G12): env1's and env2's
        # halves are normalised by their own statistics and the running statistics follow env1's half only (GPU 0's
        # replica); false: the mixed batch is normalised together.
        per_half_bn: bool = False

        def __post_init__(self) -> None:
            if (self.base not in METHODS and self.base not in LOSSES) or self.base == "ifl":
                raise ValueError(f"base must be a registered loss other than ifl ({', '.join(LOSSES)}), got "
                                 f"'{self.base}'")
            reason = why_not_a_loss(self.base)
            if reason:
                raise ValueError(f"base {reason}; IFL wraps a registered loss ({', '.join(LOSSES)})")
            base_cls = LOSSES.get(self.base)
            if not isinstance(self.base_options, dict):
                raise ValueError(f"base_options must be a mapping of the base's options, got {self.base_options!r}")
            on_val = [name for name, value in self.base_options.items() if value == "val"]
            if on_val:
                raise ValueError(f"base_options: {', '.join(on_val)}=val is chosen on val by a method of its own "
                                 f"stage; inside ifl give a number (or re-score later: longtail eval --sweep)")
            # Checked (unknown keys, types, ranges) and completed with the base's defaults, so the saved config
            # records every setting of the loss.
            self.base_options = to_dict(from_dict(base_cls.Config, self.base_options, f"base_options ({self.base})"))
            if len(self.center_weights) != len(self.center_milestones) + 1:
                raise ValueError("center_weights needs one more entry than center_milestones")
            for m in [*self.center_milestones, *self.update_milestones]:
                if not 0 <= m <= 1:
                    raise ValueError(f"milestones are fractions of the stage in [0, 1], got {m}")
            if self.sample_scale <= 1:
                raise ValueError(f"sample_scale must be > 1, got {self.sample_scale}")
            if self.center_loss not in ("l2", "cosine"):
                raise ValueError(f"center_loss must be l2 or cosine, got '{self.center_loss}'")
            if self.mixup_alpha < 0:
                raise ValueError(f"mixup_alpha must be >= 0 (0: no mixup), got {self.mixup_alpha}")

    @classmethod
    def head_needed(cls, opts: dict) -> str | None:
        base = opts.get("base", cls.Config.base)
        return LOSSES.get(base).requires_head if base in LOSSES else None

    def __init__(self, model: Classifier, cfg, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        # L_cls with the base's options: a submodule that saves nothing (its constants are non-persistent buffers).
        self.criterion = create_loss(cfg.base, cfg.base_options, ctx.train_counts, model,
                                     f"method.base_options ({cfg.base})")
        ds = ctx.dataset  # the engine always passes it; a bare context (unit use) gets N = 0
        targets = ds.train.targets.clone() if ds is not None else torch.zeros(0, dtype=torch.int64)
        n = len(targets)
        self.register_buffer("train_targets", targets, persistent=False)  # (N,)
        # Random centres (C, D) as the reference (spec G6), seeded by the run's seed through torch's RNG.
        self.centers = nn.Parameter(torch.randn(ctx.num_classes, model.feature_dim))
        self.register_buffer("env_weights", torch.ones(2, n))  # (2, N) env1 / env2 sampling weights
        self.register_buffer("record_score", torch.zeros(n))  # (N,) p_gt of each sample's last draw
        self.register_buffer("record_pos", torch.full((n,), -1, dtype=torch.int64))  # its stream position
        self.register_buffer("record_epoch", torch.tensor(-1))  # the epoch the record belongs to
        self._ctx = ctx
        self.register_load_state_dict_pre_hook(_size_sample_buffers)
        self._weight = 0.0  # centre-loss weight a of the current epoch
        self._scoring = False  # whether this epoch records confidences (a host-side flag: no device sync per step)

    # ------------------------------------------------------------------ schedule
    def _at(self, fractions: list[float], epochs: int) -> list[int]:
        return [round(f * epochs) for f in fractions]

    def center_weight(self, epoch: int, epochs: int) -> float:
        j = sum(epoch >= m for m in self._at(self.cfg.center_milestones, epochs))
        return float(self.cfg.center_weights[j])

    # ------------------------------------------------------------------ hooks
    def param_groups(self) -> list[ParamGroup]:
        rest = [p for n, p in self.named_parameters() if p.requires_grad and n != "centers"]
        # The centres: plain SGD at their own constant lr (no momentum, decay or schedule), as the reference.
        return decay_groups(rest, self.criterion.no_decay(self.model)) + [
            ParamGroup([self.centers], lr=self.cfg.center_lr, momentum=0.0, weight_decay=0.0, nesterov=False)]

    def sampler(self, dataset: LTDataset, ctx: MethodContext) -> Sampler:
        if len(self.train_targets) != len(dataset.train.targets):
            raise ValueError("ifl: built without the training set (MethodContext.dataset)")
        if ctx.stage is None:
            raise ValueError("ifl: its sampler needs the stage's batch size (MethodContext.stage)")
        batch_size = ctx.stage.batch_size  # global
        if batch_size % 2:
            raise ConfigError(f"ifl: batch_size {batch_size} must be even (half env1, half env2)")
        return EnvironmentSampler(dataset.train.targets, dataset.num_classes, ctx.sampler_seed, ctx.epochs,
                                  self.env_weights, batch_size // 2)

    def on_epoch_start(self, epoch: int, ctx: MethodContext) -> None:
        self._ctx = ctx
        super().on_epoch_start(epoch, ctx)  # the base loss's schedule
        self._weight = self.center_weight(epoch, ctx.epochs)
        updates = self._at(self.cfg.update_milestones, ctx.epochs)
        if epoch - 1 in updates and int(self.record_epoch) == epoch - 1:
            self._rebuild()  # "at the end of" the scoring epoch; idempotent, so a resume redoes it exactly
        if epoch in updates and int(self.record_epoch) != epoch:  # a fresh scoring epoch (not a resume into it)
            self.record_pos.fill_(-1)
            self.record_epoch.fill_(epoch)
        self._scoring = epoch in updates

    @torch.no_grad()
    def _rebuild(self) -> None:
        w2 = intra_weights(self.record_score.cpu(), self.train_targets.cpu(), (self.record_pos >= 0).cpu(),
                           self.num_classes, self.cfg.sample_scale)
        self.env_weights[1].copy_(w2.to(self.env_weights.device))

    # ------------------------------------------------------------------ training step
    def _center_terms(self, z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pull, move): the batch-mean centre loss as the features feel it (centres fixed) and as the centres feel
        it (features fixed)."""
        c = self.centers[targets].float()  # (B, D)
        zf = z.float()
        if self.cfg.center_loss == "cosine":  # the reference's CenterCosLoss: 1 - cos, clamped at 1e-12
            pull = (1 - F.cosine_similarity(zf, c.detach(), dim=1)).clamp_min(1e-12).mean()
            move = (1 - F.cosine_similarity(zf.detach(), c, dim=1)).clamp_min(1e-12).mean()
            return pull, move
        pull = ((zf - c.detach()) ** 2).sum(1).mean()
        move = ((zf.detach() - c) ** 2).sum(1).mean()
        return pull, move

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                batch: BatchInfo | None = None) -> dict[str, torch.Tensor]:
        mix = self.training and self.cfg.mixup_alpha > 0
        if mix:  # Mixup + IFL: one mix of the whole [env1 | env2] batch, as the reference's center_dual_mixup
            lam = float(torch.distributions.Beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha).sample())
            perm = torch.randperm(len(images), device=images.device)
            images = lam * images + (1 - lam) * images[perm]
        if self.training and self.cfg.per_half_bn:
            half = len(images) // 2
            z1 = self.model.forward_features(images[:half])  # (B/2, D) env1: BN statistics and running update
            with _running_stats_frozen(self.model):
                z2 = self.model.forward_features(images[half:])  # env2: its own statistics, no running update
            z = torch.cat([z1, z2])
        else:
            z = self.model.forward_features(images)  # (B, D)
        logits = self.model.forward_head(z)  # (B, C)
        if mix:
            loss = lam * self.criterion(logits, targets) + (1 - lam) * self.criterion(logits, targets[perm])
        else:
            loss = self.criterion(logits, targets)
        if not self.training:
            return {"loss": loss, "logits": logits}
        a = self._weight
        # Features feel a * the centre loss; the centres feel the unweighted loss (the reference rescales
        # their gradient by 1 / a) and nothing while a = 0. Both terms always in the graph (DDP needs it).
        pull, move = self._center_terms(z, targets)
        if mix:
            pull_b, move_b = self._center_terms(z, targets[perm])
            pull, move = lam * pull + (1 - lam) * pull_b, lam * move + (1 - lam) * move_b
        move = (1.0 if a > 0 else 0.0) * (move - move.detach())  # value 0: the logged loss stays L_cls + a pull
        loss = loss + a * pull + move
        if self._scoring and batch is not None:
            self._record(logits.detach(), targets, batch)  # mixup: the unmixed labels, as the reference
        return {"loss": loss, "logits": logits}

    @torch.no_grad()
    def _record(self, logits: torch.Tensor, targets: torch.Tensor, batch: BatchInfo) -> None:
        """Keep each sample's ground-truth probability from its LAST draw in the scoring epoch. Under DDP every
        rank gathers all ranks' draws, so the record (and the checkpoint rank 0 writes) is the global one."""
        step, idx = batch.step, batch.sample_ids
        ctx = self._ctx
        idx = idx.to(self.record_pos.device)
        p = logits.float().softmax(1).gather(1, targets[:, None]).squeeze(1).to(self.record_score.dtype)  # (B,)
        local = step * len(idx) + torch.arange(len(idx), device=idx.device)
        pos = local * ctx.world_size + ctx.rank  # (B,) global stream position (strided shard): later = larger
        if tdist.is_available() and tdist.is_initialized() and ctx.world_size > 1:
            parts = [[torch.empty_like(t) for _ in range(ctx.world_size)] for t in (idx, p, pos)]
            for out, t in zip(parts, (idx, p, pos), strict=True):
                tdist.all_gather(out, t)
            idx, p, pos = (torch.cat(out) for out in parts)
        # Positions are unique, so "last draw wins" is exact even when a sample repeats in a batch.
        self.record_pos.scatter_reduce_(0, idx, pos, reduce="amax")
        win = self.record_pos[idx] == pos
        self.record_score[idx[win]] = p[win]

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.criterion.adjust_scores(self.model.forward_head(feats))  # e.g. post-hoc LA (Logit-Adj + IFL)
