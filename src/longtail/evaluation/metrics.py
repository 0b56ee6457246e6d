"""Long-tailed classification metrics: pure functions of predictions, labels and training counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShotThresholds:
    """Shot groups by training images per class: many > many_above, few < few_below, medium otherwise.

    The default (> 100 / < 20) is Decoupling's, TDE's and RIDE's; OLTR's variant (>= 100 / <= 20) is
    ``inclusive=True``.
    """

    many_above: int = 100
    few_below: int = 20
    inclusive: bool = False

    def groups(self, train_counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """(C,) bool masks for 'many', 'medium', 'few'."""
        n = train_counts
        if self.inclusive:
            many, few = n >= self.many_above, n <= self.few_below
        else:
            many, few = n > self.many_above, n < self.few_below
        return {"many": many, "medium": ~many & ~few, "few": few}

    @classmethod
    def from_counts(cls, train_counts: torch.Tensor) -> ShotThresholds:
        """``eval.shots=auto``: thresholds at the terciles of the class counts, so that on any data roughly a
        third of the classes is many-shot and a third few-shot (fixed 100 / 20 thresholds put every class of a
        small dataset in one group). many > the 2/3 quantile, few < the 1/3 quantile (linear interpolation)."""
        n = torch.as_tensor(train_counts).double()
        lo, hi = torch.quantile(n, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)).tolist()
        return cls(many_above=int(hi), few_below=int(math.ceil(lo)), inclusive=False)

    def small_groups(self, train_counts: torch.Tensor) -> dict[str, int]:
        """The groups with fewer than two classes (name -> class count): their 'mean' is one class or none."""
        return {k: int(m.sum()) for k, m in self.groups(torch.as_tensor(train_counts)).items() if int(m.sum()) < 2}

    def describe(self) -> str:
        if self.inclusive:
            return f"many >= {self.many_above}, few <= {self.few_below} training images"
        return f"many > {self.many_above}, few < {self.few_below} training images"


def per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) float accuracy in [0, 1] of each class; NaN for a class absent from ``targets``."""
    correct = torch.bincount(targets[preds == targets], minlength=num_classes).double()
    total = torch.bincount(targets, minlength=num_classes).double()
    return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan")))


def macro_precision(preds: torch.Tensor, targets: torch.Tensor, num_classes: int, classes=None) -> float:
    """GLT macro precision in [0, 1]: mean over classes present in ``targets`` of TP_c / #predicted_c.

    A present class never predicted contributes 0. ``classes`` (bool mask (C,)) restricts the mean
    to a group of classes, with predicted counts still taken over the whole set (GLT convention).
    """
    tp = torch.bincount(targets[preds == targets], minlength=num_classes).double()
    predicted = torch.bincount(preds, minlength=num_classes).double()
    prec = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    present = torch.bincount(targets, minlength=num_classes) > 0
    if classes is not None:
        present = present & classes
    if not present.any():
        return float("nan")
    return float(prec[present].mean())


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    flat = targets * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _pct(x: float) -> float | None:
    """Percent rounded for JSON; None for NaN (an empty group)."""
    return None if x != x else round(100.0 * float(x), 4)


def classification_metrics(
    preds: torch.Tensor,
    targets: torch.Tensor,
    train_counts: torch.Tensor,
    thresholds: ShotThresholds = ShotThresholds(),
    attributes: torch.Tensor | None = None,
    confusion_max_classes: int = 100,
    class_groups: torch.Tensor | None = None,
) -> dict:
    """All metrics of one evaluated split, JSON-ready, accuracies in percent.

    Keys: ``top1`` (micro accuracy), ``mean_class_acc``, ``many`` / ``medium`` / ``few`` (mean of the
    per-class accuracies of the group's classes; None when the group is empty or absent from the
    split), ``precision`` (macro), ``per_class`` (C values, None for classes not in the split),
    ``group_sizes``, ``thresholds``, ``num_samples``, ``confusion`` (when C <= confusion_max_classes)
    and ``per_attribute`` (accuracy per attribute group, when ``attributes`` is given) with
    ``per_attribute_precision`` (macro precision recomputed inside each attribute group, as GLT).
    ``many_precision`` / ``medium_precision`` / ``few_precision``: macro precision over the group's classes
    with predicted counts from the whole split (GLT). ``class_groups`` ((C,) 0 / 1 / 2) replaces the
    threshold groups when a benchmark defines many / medium / few by class rank.
    """
    preds, targets = preds.long().cpu(), targets.long().cpu()
    train_counts = train_counts.long().cpu()
    num_classes = len(train_counts)
    acc = per_class_accuracy(preds, targets, num_classes)
    if class_groups is not None:
        class_groups = torch.as_tensor(class_groups).long().cpu()
        groups = {name: class_groups == i for i, name in enumerate(("many", "medium", "few"))}
    else:
        groups = thresholds.groups(train_counts)
    out: dict = {
        "top1": _pct((preds == targets).double().mean()),
        "mean_class_acc": _pct(acc.nanmean()),
        "precision": _pct(macro_precision(preds, targets, num_classes)),
    }
    for name, mask in groups.items():
        vals = acc[mask]
        out[name] = _pct(vals.nanmean()) if (~vals.isnan()).any() else None
    for name, mask in groups.items():
        out[f"{name}_precision"] = _pct(macro_precision(preds, targets, num_classes, classes=mask))
    out["per_class"] = [_pct(a) for a in acc.tolist()]
    out["group_sizes"] = {name: int(mask.sum()) for name, mask in groups.items()}
    out["thresholds"] = describe_class_groups(class_groups) if class_groups is not None else thresholds.describe()
    out["num_samples"] = len(targets)
    if num_classes <= confusion_max_classes:
        out["confusion"] = confusion_matrix(preds, targets, num_classes).tolist()
    if attributes is not None:
        attributes = attributes.long().cpu()
        out["per_attribute"] = {
            str(int(a)): _pct((preds[attributes == a] == targets[attributes == a]).double().mean())
            for a in attributes.unique()
        }
        out["per_attribute_precision"] = {
            str(int(a)): _pct(macro_precision(preds[attributes == a], targets[attributes == a], num_classes))
            for a in attributes.unique()
        }
    return out


def describe_class_groups(class_groups: torch.Tensor) -> str:
    """How class-rank shot groups are stated under a table: counts of classes per group."""
    n = torch.bincount(torch.as_tensor(class_groups).long().cpu(), minlength=3).tolist()
    return f"the benchmark's class-rank groups ({n[0]} many / {n[1]} medium / {n[2]} few classes)"
