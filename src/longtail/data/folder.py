"""The user's own data: image folders (split/class/image) and list files (`relative/path label` per line).

List files are the format of ImageNet-LT, Places-LT and iNaturalist 2018; those three are registered as
presets that check the published split sizes at load time.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from longtail.config import DataConfig, options
from longtail.data.base import DataError, LTDataset, Split
from longtail.data.images import IMAGE_EXTENSIONS, ImageLimits, read_image, resize_square
from longtail.progress import bars_off
from longtail.registry import DATASETS
from longtail.utils import display_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _require_root(cfg: DataConfig, what: str) -> Path:
    if not cfg.root:
        raise DataError(f"{what} needs data.root: the folder that holds the images (data.root=/path/to/data)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist or is not a folder; check the path")
    return root


def inside_root(path: str | Path, root: Path) -> bool:
    """Whether ``path`` (absolute, or relative to the working folder) lies in ``root``, by its name: ``..`` parts
    count, symbolic links inside root are followed wherever they point (a dataset tree of links stays usable)."""
    full, top = os.path.abspath(path), os.path.abspath(root)
    return full == top or full.startswith(top.rstrip(os.sep) + os.sep)


def read_list_file(path: str | Path, root: Path, allow_outside_root: bool = False) -> tuple[list[str], list[int]]:
    """Parse `relative/path label` lines (plain or .gz). Paths are joined to ``root`` and must stay in it (no
    ``../`` or absolute path elsewhere) unless ``allow_outside_root``; errors name the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    paths, labels = [], []
    with opener(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{path}:{lineno}: label {parts[1]!r} is not an integer") from None
            if label < 0:
                raise DataError(f"{path}:{lineno}: negative label {label}")
            image = root / parts[0]
            if not allow_outside_root and not inside_root(image, root):
                raise DataError(f"{path}:{lineno}: {parts[0]!r} lies outside data.root {root}; list paths "
                                f"relative to data.root, or set data.allow_outside_root=true to allow it")
            paths.append(str(image))
            labels.append(label)
    if not paths:
        raise DataError(f"{path}: no entries")
    return paths, labels


def _materialise(split: Split, size: int, name: str, limits: ImageLimits) -> Split:
    """Decode a file split into memory at ``size`` x ``size`` (for small datasets: fast batched training)."""
    images = torch.empty(len(split), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(tqdm(split.paths, desc=f"decoding {name}", unit="img", leave=False, mininterval=1.0,
                               disable=bars_off())):
        images[i] = resize_square(read_image(p, limits), size)
    return Split(targets=split.targets, images=images, attributes=split.attributes)


def check_files(cfg: DataConfig, name: str, splits: dict[str, Split], exist: bool = True) -> None:
    """Before anything trains: every file of every split exists (``exist``), and when the dataset has at most
    ``data.decode_check`` images (and is not decoded into memory anyway), every one decodes within the limits.
    DataError naming the first bad file."""
    if exist:
        for k, s in splits.items():
            missing = [p for p in tqdm(s.paths, desc=f"checking {name} {k} files", unit="file", leave=False,
                                       mininterval=1.0, disable=bars_off()) if not os.path.isfile(p)]
            if missing:
                raise DataError(f"{name}: image not found: {missing[0]} ({len(missing)} of the {len(s)} {k} "
                                f"images are missing); check data.root and the list/folder layout")
    total = sum(len(s) for s in splits.values())
    if cfg.in_memory != "always" and 0 < total <= cfg.decode_check:
        limits = ImageLimits.of(cfg)
        for k, s in splits.items():
            for p in tqdm(s.paths, desc=f"checking {name} {k} images", unit="img", leave=False, mininterval=1.0,
                          disable=bars_off()):
                read_image(p, limits)  # DataError naming the file (corrupt, empty, above the limits)


def _finish(cfg: DataConfig, name: str, class_names: list[str], splits: dict[str, Split],
            default_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, info: dict | None = None) -> LTDataset:
    size = cfg.image_size or default_size
    check_files(cfg, name, splits)
    if cfg.in_memory == "always":
        splits = {k: _materialise(v, size, f"{name} {k}", ImageLimits.of(cfg)) for k, v in splits.items()}
    eval_splits = ["test"] if "test" in splits else (["val"] if "val" in splits else [])
    if not eval_splits:
        raise DataError(f"{name}: no test split; add a test folder / test_list")
    return LTDataset(name=name, class_names=class_names, splits=splits, eval_splits=eval_splits,
                     image_size=size, mean=mean, std=std, info=info or {})


@DATASETS.register("image_folder")
def image_folder(cfg: DataConfig, opts: None, cache_dir: Path) -> LTDataset:
    """Your own images: data.root/{train,val,test}/<class>/<image> (val and test optional, test advised)."""
    root = _require_root(cfg, "image_folder")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder; expected {root}/train/<class>/<image>")
    class_names = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not class_names:
        raise DataError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image>")
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split in ("train", "val", "test"):
        d = root / split
        if not d.is_dir():
            continue
        paths, labels = [], []
        for cdir in sorted(x for x in d.iterdir() if x.is_dir()):
            if cdir.name not in index:
                raise DataError(f"{cdir}: class '{cdir.name}' has no train/ folder; add it to train/ or remove it")
            files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if split == "train" and not files:
                raise DataError(f"{cdir}: empty class (no images with extensions {', '.join(IMAGE_EXTENSIONS)})")
            paths += [str(p) for p in files]
            labels += [index[cdir.name]] * len(files)
        if paths:
            splits[split] = Split(targets=torch.tensor(labels), paths=paths)
    # Folder names that are not UTF-8 (decoded with surrogateescape) are shown with U+FFFD in metrics, tables
    # and plots; the files are still found by the names as they are on disk.
    return _finish(cfg, "image_folder", [display_name(c) for c in class_names], splits, default_size=224,
                   info={"root": str(root)})


@dataclass
class ListFilesConfig:
    """Options of ``imagenet_lt``, ``places_lt`` and ``inat2018`` (``data.options``): their list files, each a
    `relative/path label` line per image under data.root (a path relative to the working folder, else to data.root;
    None: the published list's name, e.g. ImageNet_LT_train.txt, looked up under data.root)."""

    train_list: str | None = None
    val_list: str | None = None  # None: the published val list if it is there (inat2018 has none)
    test_list: str | None = None


@dataclass
class ListFileConfig:
    """Options of ``list_file`` (``data.options``): your own list files, each a `relative/path label` line per image
    under data.root (a path relative to the working folder, else to data.root)."""

    train_list: str | None = None  # required
    val_list: str | None = None  # None: no val split
    test_list: str | None = None  # None: no test split (then val is the evaluated split)
    num_classes: int | None = None  # None: the largest label + 1

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}; drop it (or null) for the largest "
                             f"label + 1")


def _list_dataset(cfg: DataConfig, opts: ListFilesConfig | ListFileConfig, name: str, default_lists: dict[str, str],
                  expected: dict[str, int], num_classes: int | None) -> LTDataset:
    root = _require_root(cfg, name)
    lists = {"train": opts.train_list or default_lists.get("train"),
             "val": opts.val_list or default_lists.get("val"),
             "test": opts.test_list or default_lists.get("test")}
    splits = {}
    for split, lst in lists.items():
        if lst is None:
            continue
        lst_path = Path(lst).expanduser()
        if not lst_path.is_absolute() and not lst_path.is_file():
            lst_path = root / lst
        if split != "train" and not lst_path.is_file() and lst == default_lists.get(split):
            continue  # an optional default list that is not there
        paths, labels = read_list_file(lst_path, root, cfg.allow_outside_root)
        if split in expected and len(paths) != expected[split]:
            raise DataError(f"{lst_path}: {len(paths)} entries, but {name} {split} has {expected[split]}; "
                            f"is this the right list file?")
        splits[split] = Split(targets=torch.tensor(labels), paths=paths)
    if "train" not in splits:
        raise DataError(f"{name}: set data.options.train_list to the training list file")
    c = num_classes or int(max(int(s.targets.max()) for s in splits.values())) + 1
    for split, s in splits.items():
        if int(s.targets.max()) >= c:
            raise DataError(f"{name}: {split} list has label {int(s.targets.max())}, but there are {c} classes")
    return _finish(cfg, name, [str(i) for i in range(c)], splits, default_size=224,
                   info={"root": str(root), "lists": {k: str(v) for k, v in lists.items() if v}})


@DATASETS.register("list_file")
@options(ListFileConfig)
def list_file(cfg: DataConfig, opts: ListFileConfig, cache_dir: Path) -> LTDataset:
    """Your own list files (data.options train_list / val_list / test_list): `relative/path label` lines under
    data.root."""
    return _list_dataset(cfg, opts, "list_file", {}, {}, opts.num_classes)


@DATASETS.register("imagenet_lt")
@options(ListFilesConfig)
def imagenet_lt(cfg: DataConfig, opts: ListFilesConfig, cache_dir: Path) -> LTDataset:
    """ImageNet-LT (OLTR split lists; 115,846 / 20,000 / 50,000) under your ILSVRC-2012 root."""
    return _list_dataset(cfg, opts, "imagenet_lt", {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
                                              "test": "ImageNet_LT_test.txt"},
                         {"train": 115846, "val": 20000, "test": 50000}, 1000)


@DATASETS.register("places_lt")
@options(ListFilesConfig)
def places_lt(cfg: DataConfig, opts: ListFilesConfig, cache_dir: Path) -> LTDataset:
    """Places-LT (OLTR split lists; 62,500 / 7,300 / 36,500) under your Places365-Standard root."""
    return _list_dataset(cfg, opts, "places_lt", {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt",
                                            "test": "Places_LT_test.txt"},
                         {"train": 62500, "val": 7300, "test": 36500}, 365)


@DATASETS.register("inat2018")
@options(ListFilesConfig)
def inat2018(cfg: DataConfig, opts: ListFilesConfig, cache_dir: Path) -> LTDataset:
    """iNaturalist 2018 (437,513 train; the official val, 24,426, is the test set) under your iNat root."""
    return _list_dataset(cfg, opts, "inat2018", {"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"},
                         {"train": 437513, "test": 24426}, 8142)
