"""Datasets, imbalance profiles, samplers and loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from longtail.config import DataConfig, plugin_options
from longtail.data import builtin, cifar, folder, glt, samplers  # noqa: F401  (fill the registries)
from longtail.data.base import DataError, LTDataset, Split
from longtail.data.images import ImageLimits
from longtail.data.profiles import class_counts, hold_out, index_hash, select_long_tailed
from longtail.registry import DATASETS
from longtail.utils import default_cache_dir

__all__ = ["DataError", "LTDataset", "Split", "class_counts", "create_dataset", "select_long_tailed"]


def create_dataset(cfg: DataConfig, seed: int = 0) -> LTDataset:
    """Build the configured dataset (``DATASETS[cfg.name](cfg, options, cache_dir)``, ``options`` the instance of
    its ``Config`` that ``cfg.options`` gives, defaults filled in; None for a dataset without options); hold out
    ``cfg.val_fraction`` of train as val when asked.

    The hold-out is seeded by ``cfg.subset_seed`` (the data, not the run seed) so that runs with
    different training seeds select on the same val split.
    """
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    factory = DATASETS.get(cfg.name)
    opts = plugin_options(factory, cfg.options, "data.options", f"dataset '{cfg.name}'")  # its Config, or None
    ds: LTDataset = factory(cfg, opts, cache_dir)
    if cfg.in_memory == "never" and ds.train.in_memory:
        raise DataError(f"{ds.name} is always held in memory (small, decoded or generated once), so "
                        f"data.in_memory=never does not apply; for per-image DataLoader transforms instead of "
                        f"batched augmentation on the device set data.fast_path=false")
    if cfg.val_per_class and "val_per_class" not in ds.info:  # a builder that honours it records it
        raise DataError(f"data.val_per_class applies to cifar10_lt and cifar100_lt (a val from the training images "
                        f"their long-tailed subset left out), not to {ds.name}; use data.val_fraction or its own val")
    if cfg.val_fraction > 0:
        if "val" in ds.splits:
            raise DataError(f"{ds.name} has its own val split; drop data.val_fraction")
        tr, va = hold_out(ds.train.targets.numpy(), cfg.val_fraction, cfg.subset_seed + 1)
        ds.splits["val"] = ds.train.subset(torch.from_numpy(va))
        ds.splits["train"] = ds.train.subset(torch.from_numpy(tr))
        ds.info["val"] = f"held out {cfg.val_fraction:.0%} of train per class (hash {index_hash(va)})"
    ds.validate()
    ds.image_limits = ImageLimits.of(cfg)
    ds.info["train_size"] = len(ds.train)
    ds.info["train_counts_hash"] = index_hash(np.asarray(ds.train_counts()))
    return ds
