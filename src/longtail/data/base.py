"""The data model every dataset builder returns: labelled splits, in memory or as files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longtail.errors import DataError  # defined with the other user errors; importable from here as before


@dataclass
class Split:
    """One split of a dataset.

    Exactly one of ``images`` (small datasets, decoded once and kept in memory) or ``paths``
    (large datasets, decoded per batch by DataLoader workers) is set.
    """

    targets: torch.Tensor  # (N,) int64 class ids in [0, C)
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8
    paths: list[str] | None = None  # N image files
    attributes: torch.Tensor | None = None  # (N,) int64 attribute group inside the class, when known

    def __post_init__(self) -> None:
        self.targets = torch.as_tensor(self.targets, dtype=torch.int64)
        if (self.images is None) == (self.paths is None):
            raise ValueError("a Split holds exactly one of `images` or `paths`")
        n = len(self.images) if self.images is not None else len(self.paths)
        if n != len(self.targets):
            raise ValueError(f"{n} images but {len(self.targets)} targets")
        if self.attributes is not None:
            self.attributes = torch.as_tensor(self.attributes, dtype=torch.int64)
            if len(self.attributes) != n:
                raise ValueError(f"{n} images but {len(self.attributes)} attributes")

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, index: torch.Tensor | np.ndarray) -> Split:
        """The samples at ``index`` (1-D int), in that order."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return Split(
            targets=self.targets[index],
            images=self.images[index] if self.images is not None else None,
            paths=[self.paths[i] for i in index.tolist()] if self.paths is not None else None,
            attributes=self.attributes[index] if self.attributes is not None else None,
        )

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """(C,) int64 number of samples of each class."""
        return torch.bincount(self.targets, minlength=num_classes)


@dataclass
class LTDataset:
    """A long-tailed dataset: named splits, the class names and how to normalise its images.

    ``splits`` always has ``train``; ``val`` when the dataset (or the config) provides one; the
    splits listed in ``eval_splits`` are evaluated at the end of a run (``test`` for most datasets,
    the GLT protocol test sets for GLT datasets).
    """

    name: str
    class_names: list[str]
    splits: dict[str, Split]
    eval_splits: list[str]
    image_size: int  # side of the square network input
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    attribute_names: list[str] | None = None  # names of attribute groups, when attributes are known
    # GLT protocols this training split is scored under: protocol (CLT / ALT / GLT) -> evaluated split
    protocols: dict[str, str] = field(default_factory=dict)
    # (C,) int shot group of each class (0 many, 1 medium, 2 few) when the benchmark defines groups by class
    # rank (ImageNet-GLT, MSCOCO-GLT) instead of by training-image thresholds
    class_groups: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # provenance recorded in the run config (seed, index hash, ...)
    # data.images.ImageLimits for decoding its files (set by create_dataset from the config; None: the defaults)
    image_limits: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train(self) -> Split:
        return self.splits["train"]

    def train_counts(self) -> torch.Tensor:
        """(C,) training images per class: drives shot groups, re-balancing losses and samplers."""
        return self.train.class_counts(self.num_classes)

    def validate(self) -> None:
        """Check labels are in range and no class is empty in train; raise DataError otherwise."""
        for name, split in self.splits.items():
            if len(split) == 0:
                raise DataError(f"{self.name}: split '{name}' is empty")
            lo, hi = int(split.targets.min()), int(split.targets.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(
                    f"{self.name}: split '{name}' has label {lo if lo < 0 else hi}, outside "
                    f"[0, {self.num_classes - 1}]; labels must index the {self.num_classes} classes"
                )
        empty = (self.train_counts() == 0).nonzero().flatten().tolist()
        if empty:
            names = ", ".join(self.class_names[i] for i in empty[:5])
            raise DataError(
                f"{self.name}: {len(empty)} class(es) have no training image ({names}"
                f"{', ...' if len(empty) > 5 else ''}); remove them or add images"
            )
