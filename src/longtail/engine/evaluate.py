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


@torch.no_grad()
def extract_features(method: Method, loader: Loader, split: str, batch_size: int, amp: bool = True,
                     channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float backbone features and (N,) targets of a split, in order, on the CPU."""
    was_training = method.training
    method.eval()
    feats, targets = [], []
    try:
        for x, y in loader.eval_batches(split, batch_size):
            with autocast(loader.device, amp):
                f = method.model.forward_features(loader.normalize(x, channels_last))
            feats.append(f.float().cpu())
            targets.append(y.cpu())
    finally:
        method.train(was_training)
    return torch.cat(feats), torch.cat(targets)


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``method.alpha=0:3:0.25`` (start:stop:step, stop included) or ``method.alpha=0,1.5,3``."""
    if "=" not in text:
        raise ValueError(f"--sweep '{text}' must look like method.alpha=0:3:0.25 or method.alpha=0,1,2")
    key, spec = text.split("=", 1)
    if not key.startswith("method.") or key.count(".") != 1:
        raise ValueError(f"--sweep sweeps a prediction-time method option (method.NAME), got '{key}'")
    try:
        if ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--sweep '{text}': values must be start:stop:step (step > 0) or a comma list") from None
    return key.split(".", 1)[1], values


def sweep_option(method: Method, loader: Loader, split: str, option: str, values: list[float], cfg: EvalConfig,
                 amp: bool = True) -> list[dict]:
    """Metrics of ``split`` for each value of a prediction-time method option, from one pass of features.

    Returns rows ``{option: value, top1, many, medium, few, precision}``; the option is restored after.
    """
    if not hasattr(method.cfg, option):
        known = ", ".join(f for f in vars(method.cfg))
        raise ValueError(f"method '{type(method).__name__}' has no option '{option}' (options: {known or 'none'})")
    feats, targets = extract_features(method, loader, split, cfg.batch_size, amp)
    counts = loader.ds.train_counts()
    old = getattr(method.cfg, option)
    rows = []
    try:
        for v in values:
            setattr(method.cfg, option, v)
            preds = torch.cat([method.predict_features(feats[i:i + cfg.batch_size].to(loader.device)).argmax(1).cpu()
                               for i in range(0, len(feats), cfg.batch_size)])
            m = classification_metrics(preds, targets, counts, thresholds_of(cfg))
            rows.append({option: v, **{k: m[k] for k in ("top1", "many", "medium", "few", "precision")}})
    finally:
        setattr(method.cfg, option, old)
    return rows
