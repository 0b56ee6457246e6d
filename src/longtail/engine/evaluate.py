"""Run a method over an evaluation split and compute its metrics."""

from __future__ import annotations

import contextlib
import logging

import torch

from longtail.config import EvalConfig
from longtail.data.loaders import Loader
from longtail.data.samplers import shard
from longtail.dist import DistInfo, gather_in_order
from longtail.errors import ConfigError, UsageError
from longtail.evaluation.metrics import ShotThresholds, classification_metrics
from longtail.methods import Method

log = logging.getLogger("longtail")


def thresholds_of(cfg: EvalConfig, train_counts: torch.Tensor | None = None) -> ShotThresholds:
    """The shot thresholds of ``cfg``: fixed (``many_above`` / ``few_below``) or, with ``shots=auto``, the
    terciles of ``train_counts`` (required then)."""
    if cfg.shots == "auto":
        if train_counts is None:
            raise ValueError("eval.shots=auto needs the training class counts")
        return ShotThresholds.from_counts(train_counts)
    return ShotThresholds(cfg.many_above, cfg.few_below, cfg.inclusive)


LONG_TAILED_VAL = 2.0  # a val split whose largest / smallest non-empty class exceeds this is long-tailed


def select_metric_of(cfg: EvalConfig, val_targets: torch.Tensor, num_classes: int) -> str:
    """The val metric ``eval.select=best_val`` picks the epoch on: ``eval.select_metric``, and for ``auto``
    mean-class accuracy on a long-tailed val split (micro top-1 there follows the head classes) and top-1 on a
    (nearly) balanced one, where the two agree up to rounding. Classes without val images are left out of the
    ratio (CIFAR-LT's ``val_per_class`` leaves the head class none)."""
    if cfg.select_metric != "auto":
        return cfg.select_metric
    counts = torch.bincount(torch.as_tensor(val_targets), minlength=num_classes)
    counts = counts[counts > 0]
    if len(counts) and counts.max().item() / counts.min().item() > LONG_TAILED_VAL:
        return "mean_class_acc"
    return "top1"


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU; a no-op on CPU, where training stays fp32 and bit-reproducible."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_split(
    fn,
    method: Method,
    loader: Loader,
    split: str,
    batch_size: int,
    amp: bool,
    channels_last: bool,
    dist: DistInfo | None,
    to_cpu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(images)`` over a whole split in order, the method in eval mode -> ((N, ...) float outputs, (N,)
    targets), on the CPU (``to_cpu``) or on the loader's device: the one batched loop behind every pass over a
    split's images (scores, features for evaluation, sweeps and fits on features).

    The outputs stay on the device until the split is done (one read back, no host wait per batch).

    Under DDP each rank runs its shard of the split and the shards are gathered back into split order with
    the padding dropped, so every sample counts exactly once (and every rank holds them all).
    """
    dist = dist or DistInfo()
    n = len(loader.ds.splits[split])
    indices = shard(torch.arange(n), dist.rank, dist.world_size) if dist.enabled else None
    was_training = method.training
    method.eval()
    outs, targets = [], []
    try:
        for x, y in loader.eval_batches(split, batch_size, indices):
            with autocast(loader.device, amp):
                o = fn(loader.normalize(x, channels_last))
            outs.append(o.float())
            targets.append(y)
    finally:
        method.train(was_training)
    out, tgt = torch.cat(outs), torch.cat(targets)
    if dist.enabled:
        out, tgt = gather_in_order(out, n, dist), gather_in_order(tgt, n, dist)
    return (out.cpu(), tgt.cpu()) if to_cpu else (out, tgt)


def predict_split(
    method: Method,
    loader: Loader,
    split: str,
    batch_size: int,
    amp: bool = True,
    channels_last: bool = False,
    dist: DistInfo | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float scores and (N,) targets of a whole split, in split order, on the CPU."""
    return run_split(method.predict, method, loader, split, batch_size, amp, channels_last, dist)


def extract_features(
    method: Method,
    loader: Loader,
    split: str,
    batch_size: int,
    amp: bool = True,
    channels_last: bool = False,
    dist: DistInfo | None = None,
    to_cpu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float backbone features and (N,) targets of a split, in order, on the CPU (or, ``to_cpu=False``,
    on the loader's device)."""
    return run_split(method.model.forward_features, method, loader, split, batch_size, amp, channels_last, dist,
                     to_cpu)


@torch.no_grad()
def predict_features_in_chunks(method: Method, feats: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) CPU argmax predictions of ``method.predict_features`` on (N, D) features (on the device), in chunks of
    ``batch_size``, the method in eval mode: one read back for all chunks (no host wait per chunk)."""
    was = method.training
    method.eval()
    try:
        chunks = [feats[i : i + batch_size] for i in range(0, len(feats), batch_size)]
        return torch.cat([method.predict_features(f).argmax(1) for f in chunks]).cpu()
    finally:
        method.train(was)


def evaluate_split(
    method: Method,
    loader: Loader,
    split: str,
    cfg: EvalConfig,
    amp: bool = True,
    channels_last: bool = False,
    dist: DistInfo | None = None,
) -> dict:
    """Metrics dict of one split (see ``classification_metrics``) with the method's ``extra_metrics`` merged in
    (e.g. DLSA's ``routes``); identical on every rank under DDP.

    A method with ``metrics_on_features`` is scored from one pass of features (``predict_features`` on them, in
    float32, chunks of ``cfg.batch_size``), which ``extra_metrics`` then receives; any other by ``predict``.
    """
    s = loader.ds.splits[split]
    counts = loader.ds.train_counts()
    thresholds = thresholds_of(cfg, counts)
    feats = None
    if method.metrics_on_features:
        feats, targets = extract_features(method, loader, split, cfg.batch_size, amp, channels_last, dist)
        feats = feats.to(loader.device)  # moved once and scored on the device, read back once
        preds = predict_features_in_chunks(method, feats, cfg.batch_size)
    else:
        scores, targets = predict_split(method, loader, split, cfg.batch_size, amp, channels_last, dist)
        preds = scores.argmax(1)
    out = classification_metrics(
        preds, targets, counts, thresholds, attributes=s.attributes, class_groups=loader.ds.class_groups
    )
    was = method.training
    method.eval()
    try:
        out.update(method.extra_metrics(feats, preds, targets, counts, thresholds, cfg.batch_size))
    finally:
        method.train(was)
    return out


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``method.alpha=0:3:0.25`` (start:stop:step, stop included) or ``method.alpha=0,1.5,3``."""
    if "=" not in text:
        raise UsageError(f"--sweep '{text}' must look like method.alpha=0:3:0.25 or method.alpha=0,1,2")
    key, spec = text.split("=", 1)
    if not key.startswith("method.") or key.count(".") != 1:
        raise UsageError(f"--sweep sweeps a prediction-time method option (method.NAME), got '{key}'")
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
        raise UsageError(f"--sweep '{text}': values must be start:stop:step (step > 0) or a comma list") from None
    return key.split(".", 1)[1], values


SWEEP_KEYS = ("top1", "many", "medium", "few", "precision")


def sweep_option(
    method: Method,
    loader: Loader,
    split: str,
    option: str,
    values: list[float],
    cfg: EvalConfig,
    amp: bool = True,
    channels_last: bool = False,
    dist: DistInfo | None = None,
    keys: tuple[str, ...] = SWEEP_KEYS,
) -> list[dict]:
    """Metrics of ``split`` for each value of a prediction-time method option, from one pass of features.

    Returns rows ``{option: value, top1, many, medium, few, precision}`` (``keys``: which metrics); the option
    is restored after. Under DDP (``dist``) the features are gathered, so every rank computes the same rows.
    """
    _check_option(method, option)
    feats, targets = extract_features(method, loader, split, cfg.batch_size, amp, channels_last, dist)
    return _sweep_features(method, feats, targets, loader, option, values, cfg, keys)


def _check_option(method: Method, option: str) -> None:
    if not hasattr(method.cfg, option):
        known = ", ".join(f for f in vars(method.cfg))
        raise UsageError(f"method '{type(method).__name__}' has no option '{option}' (options: {known or 'none'})")


def _sweep_features(
    method: Method,
    feats: torch.Tensor,
    targets: torch.Tensor,
    loader: Loader,
    option: str,
    values: list[float],
    cfg: EvalConfig,
    keys: tuple[str, ...],
) -> list[dict]:
    """``sweep_option``'s rows from (N, D) features already extracted (on the CPU) and their (N,) targets."""
    counts = loader.ds.train_counts()
    old = getattr(method.cfg, option)
    rows = []
    on_device = feats.to(loader.device)  # moved once for all values; predictions read back once per value
    try:
        for v in values:
            setattr(method.cfg, option, v)
            preds = predict_features_in_chunks(method, on_device, cfg.batch_size)
            m = classification_metrics(preds, targets, counts, thresholds_of(cfg, counts))
            rows.append({option: v, **{k: m[k] for k in keys}})
    finally:
        setattr(method.cfg, option, old)
    return rows


CHOICE_METRIC = "mean_class_acc"  # = balanced top-1 on a balanced val; averages the classes the split has


def choose_on_val(
    method: Method,
    loader: Loader,
    option: str,
    grid: list[float],
    cfg: EvalConfig,
    amp: bool = True,
    channels_last: bool = False,
    dist: DistInfo | None = None,
) -> dict:
    """Sweep a prediction-time option over ``grid`` on the val split and return the choice.

    The best ``mean_class_acc`` wins; a tie goes to the first grid value. Returns ``{option, split, metric,
    value, score, curve}`` with ``curve`` the rows of ``sweep_option`` (plus the metric); the method is not
    changed (the caller stores the value with ``method.set_chosen``).
    """
    if "val" not in loader.ds.splits:
        raise ConfigError(
            f"method.{option}=val needs a validation split and this run has none (never chosen on "
            f"test): set data.val_per_class (CIFAR-LT) or data.val_fraction"
        )
    rows = sweep_option(
        method, loader, "val", option, grid, cfg, amp, channels_last, dist, keys=(CHOICE_METRIC, *SWEEP_KEYS)
    )
    scores = [r[CHOICE_METRIC] if r[CHOICE_METRIC] is not None else float("-inf") for r in rows]
    best = max(range(len(rows)), key=lambda i: (scores[i], -i))  # highest score, then the earliest value
    _warn_at_grid_edge(option, rows, scores, best)
    return {
        "option": option,
        "split": "val",
        "metric": CHOICE_METRIC,
        "value": rows[best][option],
        "score": rows[best][CHOICE_METRIC],
        "curve": rows,
    }


def _warn_at_grid_edge(option: str, rows: list[dict], scores: list[float], best: int) -> None:
    """A warning when the choice is the grid's largest value and beats the next one down: the best may lie
    beyond the grid (the smallest value is often the correction's off value, and off_values checks it)."""
    values = [r[option] for r in rows]
    if len(values) < 2 or values[best] != max(values):
        return
    below = max((i for i in range(len(values)) if values[i] < values[best]), key=lambda i: values[i])
    if scores[best] > scores[below]:
        log.warning("method.%s=%g chosen on val is the largest value of its grid and scores above %g (%.2f against "
                    "%.2f): the best may lie beyond; widen method.%s_grid", option, values[best], values[below],
                    scores[best], scores[below], option)


def check_off_values(
    method: Method,
    loader: Loader,
    cfg: EvalConfig,
    amp: bool = True,
    channels_last: bool = False,
    dist: DistInfo | None = None,
    choices: list[dict] | None = None,
) -> list[dict]:
    """Does the method's prediction-time correction (``Method.off_values``) help on the val split?

    For each such option: the val ``mean_class_acc`` (and top1) at the value the method predicts with (configured,
    chosen on val, or TDE's auto) and at the off value, from one pass of features; ``hurts`` when the value scores
    below the off value, or when ``OPTION: val`` chose the off value itself (no other grid value scored above it:
    ``choices``, the ``chosen_on_val`` records, give its curve). ``warning`` is then one line with both numbers
    and the method's ``diagnostics`` summary; ``diagnostics`` holds the full statistics. [] without a val split.
    """
    if not method.off_values or "val" not in loader.ds.splits:
        return []
    feats, targets = extract_features(method, loader, "val", cfg.batch_size, amp, channels_last, dist)
    out = []
    for option, (off, off_name) in method.off_values.items():
        _check_option(method, option)
        configured = getattr(method.cfg, option)
        value = method.option(option)
        rows = _sweep_features(method, feats, targets, loader, option, [value, off], cfg, (CHOICE_METRIC, "top1"))
        score, off_score = rows[0][CHOICE_METRIC], rows[1][CHOICE_METRIC]
        how = {"val": "chosen on val", "auto": "auto"}.get(configured, "configured") if isinstance(configured, str) \
            else "configured"
        rec = {"option": option, "value": value, "how": how, "off_value": off, "off_name": off_name, "split": "val",
               "metric": CHOICE_METRIC, "score": score, "off_score": off_score, "top1": rows[0]["top1"],
               "off_top1": rows[1]["top1"], "hurts": False}
        if score is not None and off_score is not None and score < off_score:
            rec["hurts"] = True
            rec["warning"] = (f"method.{option}={value:g} ({how}) scores {score:.2f} {CHOICE_METRIC} on val, below "
                              f"{off_score:.2f} at {option}={off:g} ({off_name}): the correction costs accuracy on "
                              f"this data; predict with method.{option}={off:g} or method.{option}=val")
        elif configured == "val" and value == off:
            curve = next((c["curve"] for c in reversed(choices or []) if c.get("option") == option), [])
            others = [r for r in curve if r[option] != off and r.get(CHOICE_METRIC) is not None]
            best = max(others, key=lambda r: r[CHOICE_METRIC], default=None)
            rec["hurts"] = True
            other = f"; the best other, {option}={best[option]:g}, {best[CHOICE_METRIC]:.2f}" if best else ""
            rec["warning"] = (f"method.{option}=val chose {option}={off:g}: no other value of {option}_grid scored "
                              f"above {off_name} on val ({off_score:.2f} {CHOICE_METRIC}{other}), so this run predicts "
                              f"as {off_name}: the correction does not help on this data")
        diag = method.diagnostics(feats, targets, loader.ds.class_names)
        if diag:
            rec["diagnostics"] = diag
            if rec["hurts"] and diag.get("summary"):
                rec["warning"] += f". On val: {diag['summary']}"
        out.append(rec)
    return out
