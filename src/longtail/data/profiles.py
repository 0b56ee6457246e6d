"""Imbalance profiles and seeded long-tailed subset selection."""

from __future__ import annotations

import hashlib

import numpy as np

from longtail.errors import DataError


def class_counts(num_classes: int, n_max: int, imbalance_ratio: float, profile: str = "exp") -> list[int]:
    """Training images per class, class 0 the largest.

    exp:  n_i = int(n_max * r^(i / (C - 1))), r = 1 / imbalance_ratio   (Cao et al.; BBN; TDE)
    step: the first C // 2 classes n_max, the others int(n_max * r)
    """
    if num_classes < 1 or n_max < 1:
        raise DataError("num_classes and n_max must be positive")
    if imbalance_ratio < 1:
        raise DataError(f"imbalance_ratio is n_max / n_min and must be >= 1, got {imbalance_ratio}")
    r = 1.0 / imbalance_ratio
    if profile == "exp":
        if num_classes == 1:
            return [n_max]
        return [int(n_max * r ** (i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [n_max] * half + [int(n_max * r)] * (num_classes - half)
    raise DataError(f"unknown imbalance profile '{profile}' (exp or step)")


def select_long_tailed(targets: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices of a long-tailed subset keeping ``counts[c]`` images of class c.

    Bit-compatible with the Cao et al. generator (LDAM-DRW ``imbalance_cifar.py``): seed NumPy's legacy
    RNG, then for classes in ascending order shuffle that class's indices (original order) and keep the
    first n_c. Returns indices grouped by class, as that generator does.
    """
    targets = np.asarray(targets)
    # Cao et al. use the global legacy RNG; a RandomState with the same seed draws the same stream
    # without touching global state.
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(targets == c)[0]
        if n > len(idx):
            raise DataError(f"class {c} has {len(idx)} images, fewer than the {n} the profile asks for")
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def hold_out(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val): ``fraction`` of each class to val, at least one image per class
    when the class has two or more, never the last image of a class. Seeded; sorted outputs."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def draw_unused(
    targets: np.ndarray, keep: np.ndarray, per_class: int, num_classes: int, seed: int
) -> tuple[np.ndarray, list[int]]:
    """Indices of up to ``per_class`` images of each class among those NOT in ``keep`` (the images a long-tailed
    subset left out), and the (C,) number drawn per class.

    Seeded (``numpy.random.default_rng([seed, 2])``, a stream independent of the subset's own); a class with fewer
    unused images than ``per_class`` gives all it has (the head class at n_max: none). Indices are sorted within
    each class, classes in ascending order.
    """
    targets = np.asarray(targets)
    unused = np.ones(len(targets), dtype=bool)
    unused[np.asarray(keep, dtype=np.int64)] = False
    rng = np.random.default_rng([seed, 2])
    out, counts = [], []
    for c in range(num_classes):
        idx = np.where(unused & (targets == c))[0]
        take = np.sort(rng.permutation(idx)[:per_class])
        out.append(take)
        counts.append(len(take))
    return (np.concatenate(out) if out else np.zeros(0, dtype=np.int64)), counts


def index_hash(indices: np.ndarray) -> str:
    """Short hash of a selection, recorded in the run config so two runs can tell they used the same subset."""
    return hashlib.sha1(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]
