"""CIFAR-10-LT and CIFAR-100-LT: from torchvision's CIFAR files or from an image-folder copy (folder or zip)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from longtail.config import DataConfig, options
from longtail.data.base import DataError, LTDataset, Split
from longtail.data.images import IMAGE_EXTENSIONS, ImageLimits, decode_bytes
from longtail.data.profiles import class_counts, draw_unused, index_hash, select_long_tailed
from longtail.progress import bars_off
from longtail.registry import DATASETS
from longtail.utils import atomic_torch_save

log = logging.getLogger("longtail")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)  # the values of the LDAM-DRW / BBN / TDE code
# Seconds a download waits on a connection that sends nothing (a blackholed network) before it fails with the
# one-line error below; a slow download that keeps sending is never cut (the wait is per read).
DOWNLOAD_TIMEOUT_S = 60.0


def _default_root(num_classes: int) -> Path:
    env = os.environ.get("LONGTAIL_DATA")
    return Path(env) / f"cifar{num_classes}" if env else Path.home() / ".cache" / "longtail" / f"cifar{num_classes}"


def _load_torchvision(root: Path, num_classes: int, download: bool) -> tuple[dict, list[str]]:
    """{'train': (images (N,3,32,32) uint8, targets), 'test': ...} from the pickled CIFAR batches."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    out = {}
    before = socket.getdefaulttimeout()  # torchvision's urlopen takes no timeout: it waits the default one
    try:
        if download:
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        for split in ("train", "test"):
            ds = cls(str(root), train=split == "train", download=download)
            out[split] = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), np.asarray(ds.targets))
    except RuntimeError as e:
        raise DataError(
            f"CIFAR-{num_classes} not found under {root} ({e}). Point data.root at a folder holding "
            f"the CIFAR python batches, at an image-folder copy (train/<class>/*.jpg, test/<class>/*.jpg, "
            f"or a .zip of it), or set data.options.download=true to download it"
        ) from None
    except OSError as e:  # no network (urllib's URLError), a refused or cut connection, a folder not writable
        if not download:
            raise
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError):
            reason = f"no answer for {DOWNLOAD_TIMEOUT_S:g} s"
        raise DataError(
            f"could not download CIFAR-{num_classes} into {root}: {reason}. Check the network, or put "
            f"{cls.filename} (from {cls.url}) in {root} by hand and run again"
        ) from None
    finally:
        socket.setdefaulttimeout(before)
    return out, list(ds.classes)


def _check_member(root: Path, info: zipfile.ZipInfo, limits: ImageLimits) -> None:
    """A zip member's sizes from the zip's directory, before a byte of it is inflated (zipfile reads no more than
    the directory's size, and checks it)."""
    name = f"{root}:{info.filename}"
    limits.check_file_size(info.file_size, name)
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > 2**20 and ratio > limits.max_zip_ratio:
        raise DataError(f"{name}: inflates {ratio:.0f}x ({info.compress_size} -> {info.file_size} bytes), above "
                        f"data.max_zip_ratio={limits.max_zip_ratio:g} (a zip bomb? images barely compress); "
                        f"raise data.max_zip_ratio if the zip is yours, or remove the member")


def _folder_members(root: Path, limits: ImageLimits) -> tuple[list[tuple[str, str, str]], callable]:
    """(split, class, name) of every image in an image-folder copy, and a reader of one member's bytes."""
    if root.is_file() and zipfile.is_zipfile(root):
        zf = zipfile.ZipFile(root)
        members = []
        for info in zf.infolist():
            name, parts = info.filename, info.filename.split("/")
            if name.lower().endswith(IMAGE_EXTENSIONS) and len(parts) >= 3 and parts[-3] in ("train", "test"):
                _check_member(root, info, limits)
                members.append((parts[-3], parts[-2], name))

        def read_member(m: str) -> bytes:
            try:
                with zf.open(m) as f:  # read(n) inflates at most n bytes at a time, whatever the data holds
                    return f.read(zf.getinfo(m).file_size)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:  # e.g. a size that lies
                raise DataError(f"{root}:{m}: damaged zip member ({e}); re-create the zip, or use the folder "
                                f"it came from as data.root") from None

        return members, read_member
    if root.is_dir():
        members = []
        for split in ("train", "test"):
            for p in sorted((root / split).glob("*/*")) if (root / split).is_dir() else []:
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    members.append((split, p.parent.name, str(p)))

        def read(m: str) -> bytes:
            limits.check_file_size(os.path.getsize(m), m)
            return Path(m).read_bytes()

        return members, read
    raise DataError(f"dataset root {root} does not exist; set data.root to the CIFAR folder or zip")


def _load_image_folder(root: Path, num_classes: int, cache_dir: Path,
                       limits: ImageLimits) -> tuple[dict, list[str]]:
    """Decode an image-folder copy once (cached as uint8 tensors); classes sorted by name, files by name.

    Sorted class names give the canonical CIFAR label order; files numbered within a class keep the
    original order, so the seeded subset matches the one drawn from the pickled batches' order.
    """
    stat = root.stat()
    key = hashlib.sha1(f"{root.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|v1".encode()).hexdigest()[:16]
    cache = cache_dir / f"cifar{num_classes}" / f"folder-{key}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return {s: (blob[f"{s}_images"], blob[f"{s}_targets"].numpy()) for s in ("train", "test")}, blob["classes"]
    members, read = _folder_members(root, limits)
    classes = sorted({c for s, c, _ in members if s == "train"})
    if len(classes) != num_classes:
        raise DataError(
            f"{root}: expected {num_classes} class folders under train/, found {len(classes)} "
            f"({', '.join(classes[:12])}); is this CIFAR-{num_classes}?"
        )
    index = {c: i for i, c in enumerate(classes)}
    out, blob = {}, {"classes": classes}
    for split in ("train", "test"):
        items = sorted((m for m in members if m[0] == split), key=lambda m: (index.get(m[1], -1), m[2]))
        unknown = [m for m in items if m[1] not in index]
        if unknown:
            raise DataError(f"{root}: {split}/{unknown[0][1]} is not one of the training classes")
        if not items:
            raise DataError(f"{root}: no images under {split}/")
        imgs = torch.empty(len(items), 3, 32, 32, dtype=torch.uint8)
        for i, (_, _, name) in enumerate(tqdm(items, desc=f"decoding CIFAR-{num_classes} {split}", unit="img",
                                               leave=False, mininterval=1.0, disable=bars_off())):
            img = decode_bytes(read(name), f"{root}:{name}", limits)
            if img.shape != (3, 32, 32):
                raise DataError(f"{root}:{name}: expected a 32x32 image, got {tuple(img.shape[1:])}")
            imgs[i] = img
        targets = np.array([index[m[1]] for m in items], dtype=np.int64)
        out[split] = (imgs, targets)
        blob[f"{split}_images"], blob[f"{split}_targets"] = imgs, torch.from_numpy(targets)
    atomic_torch_save(blob, cache)
    return out, classes


@dataclass
class CifarLTConfig:
    """Options of ``cifar10_lt`` and ``cifar100_lt`` (``data.options``)."""

    # n_max, the head class's training images; None: all of them (5000 for CIFAR-10, 500 for CIFAR-100), as Cao et
    # al.: n_i = int(n_max * r^(-i/(C-1))) for the exp profile.
    max_per_class: int | None = None
    download: bool = False  # allow torchvision to download CIFAR into data.root (never implicit)

    def __post_init__(self) -> None:
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1, got {self.max_per_class}; drop it (or null) for the "
                             f"dataset's default")


def build_cifar_lt(cfg: DataConfig, opts: CifarLTConfig, cache_dir: Path, num_classes: int) -> LTDataset:
    if cfg.image_size not in (None, 32):
        raise DataError(f"cifar{num_classes}_lt keeps the 32x32 images in memory; drop data.image_size")
    root = Path(cfg.root).expanduser() if cfg.root else _default_root(num_classes)
    is_folder_copy = root.is_file() or (root / "train").is_dir()
    if is_folder_copy:
        data, classes = _load_image_folder(root, num_classes, cache_dir, ImageLimits.of(cfg))
    else:
        data, classes = _load_torchvision(root, num_classes, opts.download)
    train_images, train_targets = data["train"]
    n_max = opts.max_per_class or int(np.bincount(train_targets).max())
    counts = class_counts(num_classes, n_max, cfg.imbalance_ratio, cfg.profile)
    keep = select_long_tailed(train_targets, counts, cfg.subset_seed)
    test_images, test_targets = data["test"]
    splits = {
        "train": Split(targets=torch.from_numpy(train_targets[keep]), images=train_images[keep]),
        "test": Split(targets=torch.from_numpy(test_targets), images=test_images),
    }
    info = {"source": str(root), "subset_seed": cfg.subset_seed, "subset_hash": index_hash(keep), "counts": counts}
    if cfg.val_per_class:
        splits["val"], info_val = _unused_val(train_targets, train_images, keep, cfg, classes)
        info.update(info_val)
    return LTDataset(
        name=f"cifar{num_classes}_lt",
        class_names=classes,
        splits=splits,
        eval_splits=["test"],
        image_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        info=info,
    )


def _unused_val(targets: np.ndarray, images: torch.Tensor, keep: np.ndarray, cfg: DataConfig,
                classes: list[str]) -> tuple[Split, dict]:
    """``data.val_per_class``: a val split of K images per class from the CIFAR training images the long-tailed
    subset did not keep (never from test; the train split and its subset hash are those without this option).

    A stage 2 on a run trained without val can then choose (tau, an epoch) on images its backbone never saw;
    ``data.val_fraction`` would carve val out of the long-tailed train that stage 1 trained on.

    The head class keeps all of its images at the default n_max (5000 for CIFAR-10, 500 for CIFAR-100), so it has
    none left: its val holds what exists (none there; CIFAR-100-LT r=100's next classes have 23 and 45), a warning
    says so and ``info['val_counts']`` records the per-class counts. Selection by mean per-class accuracy then
    averages over the classes present only, so a choice never pays for what it costs the head class: on
    CIFAR-10-LT it leans towards tail-favouring values (a larger tau-norm or logit-adjustment tau) than a
    complete balanced val would pick. Read the chosen value with that in mind, or lower
    data.options.max_per_class (which changes train) for a val that has every class.
    """
    k = cfg.val_per_class
    idx, got = draw_unused(targets, keep, k, len(classes), cfg.subset_seed)
    if not len(idx):
        raise DataError(f"data.val_per_class={k}: the long-tailed subset keeps every training image of every class; "
                        f"no image is left for val")
    short = [c for c, n in enumerate(got) if n < k]
    if short:
        log.warning("data.val_per_class=%d: %d class(es) have fewer unused training images, their val holds what "
                    "exists: %s", k, len(short), ", ".join(f"{classes[c]} {got[c]}" for c in short[:10]))
    info = {"val": f"{k} per class from the CIFAR training images the long-tailed subset left out"
                   f"{f' ({len(short)} class(es) fewer)' if short else ''} (hash {index_hash(idx)})",
            "val_per_class": k, "val_counts": got}
    return Split(targets=torch.from_numpy(targets[idx]), images=images[idx]), info


@DATASETS.register("cifar10_lt")
@options(CifarLTConfig)
def cifar10_lt(cfg: DataConfig, opts: CifarLTConfig, cache_dir: Path) -> LTDataset:
    """CIFAR-10-LT: exp/step profile over CIFAR-10 train (seeded, Cao-compatible), full balanced test."""
    return build_cifar_lt(cfg, opts, cache_dir, 10)


@DATASETS.register("cifar100_lt")
@options(CifarLTConfig)
def cifar100_lt(cfg: DataConfig, opts: CifarLTConfig, cache_dir: Path) -> LTDataset:
    """CIFAR-100-LT: exp/step profile over CIFAR-100 train (seeded, Cao-compatible), full balanced test."""
    return build_cifar_lt(cfg, opts, cache_dir, 100)
