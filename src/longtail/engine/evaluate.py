"""Run a method over an evaluation split and compute its metrics."""

from __future__ import annotations

import contextlib

import torch

from longtail.config import EvalConfig
from longtail.data.loaders import Loader
from longtail.evaluation.metrics import ShotThresholds, classification_metrics
from longtail.methods import Method


def thresholds_of(cfg: EvalConfig) -> ShotThresholds:
    return ShotThresholds(cfg.many_above, cfg.few_below, cfg.inclusive)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU; a no-op on CPU, where training stays fp32 and bit-reproducible."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_split(method: Method, loader: Loader, split: str, batch_size: int, amp: bool = True,
                  channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float scores and (N,) targets of a whole split, in split order, on the CPU."""
    was_training = method.training
    method.eval()
    scores, targets = [], []
    try:
        for x, y in loader.eval_batches(split, batch_size):
            with autocast(loader.device, amp):
                s = method.predict(loader.normalize(x, channels_last))
            scores.append(s.float().cpu())
            targets.append(y.cpu())
    finally:
        method.train(was_training)
    return torch.cat(scores), torch.cat(targets)


def evaluate_split(method: Method, loader: Loader, split: str, cfg: EvalConfig, amp: bool = True,
                   channels_last: bool = False) -> dict:
    """Metrics dict of one split (see ``classification_metrics``)."""
    scores, targets = predict_split(method, loader, split, cfg.batch_size, amp, channels_last)
    s = loader.ds.splits[split]
    return classification_metrics(scores.argmax(1), targets, loader.ds.train_counts(), thresholds_of(cfg),
                                  attributes=s.attributes)
