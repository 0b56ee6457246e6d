"""GLT benchmarks from annotation files (spec glt_ifl.md 2): ImageNet-GLT, MSCOCO-GLT, and your own.

The authors' released files (and the ones ``longtail data glt`` / ``longtail data coco-glt`` write) are JSON.
ImageNet-GLT (``_ImageNetGeneration/imagenet_glt_generation.py``) keys every field by the image path:

    {"cat2id": {...}, "id2cat": {...},
     "train": {"label": {path: class}, "frequency": {path: 0|1|2}, "attribute": {path: 0|1|2}},
     "val": ..., "test_lt": ..., "test_bl": ..., "test_bbl": ...}

MSCOCO-GLT (written by ``_COCOGeneration/mscoco_glt_crop.py``, read by ``data/DT_COCO_LT.py``) keys every field
by the object id and stores the crop's path in its own field; the top level also holds ``key2path`` (written
empty):

    {"cat2id": {...}, "id2cat": {...}, "key2path": {},
     "train": {"label": {id: class}, "frequency": {id: 0|1|2}, "attribute": {id: 0|1|2},
               "path": {id: crop path}, "attribute_score": {id: float}, "attribute_dist": {class id: [204 counts]}},
     ...}

A split the generator skipped (``test_lt`` of the Train-CBL file) is present with empty fields. Paths in the
released files are absolute paths on the authors' machine (spec G2): we rewrite them onto ``data.root`` by
stripping ``data.options.path_prefix``, or, when no prefix is given, by finding the shortest tail of the first path that
exists under ``data.root``; then every file is checked.

Split names follow shapes_glt: ``test_bl`` -> ``test_cbl`` (Test-CBL), ``test_bbl`` -> ``test_gbl`` (Test-GBL),
``test_lt`` stays. A file with ``test_lt`` is a Train-GLT file (protocols CLT, GLT); one without is Train-CBL (ALT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from longtail.config import DataConfig, options
from longtail.data.base import DataError, LTDataset, Split
from longtail.data.builtin import glt_protocols
from longtail.data.folder import IMAGENET_MEAN, IMAGENET_STD, _materialise, check_files, inside_root
from longtail.data.images import ImageLimits
from longtail.progress import bars_off
from longtail.registry import DATASETS

SPLIT_NAMES = {"train": "train", "val": "val", "test_lt": "test_lt", "test_bl": "test_cbl", "test_bbl": "test_gbl"}
COCO_MEAN, COCO_STD = (0.473, 0.429, 0.370), (0.277, 0.268, 0.274)  # spec glt_ifl.md 8


def _entries(split: dict, where: str) -> list[tuple[str, int, int, int]]:
    """(path, label, frequency group, attribute) per image, in the file's order (the order of ``label``)."""
    if not isinstance(split, dict) or not isinstance(split.get("label"), dict):
        raise DataError(f"{where}: expected {{'label': {{key: class}}, 'frequency': ..., 'attribute': ...}}")
    labels = split["label"]
    freq, attr = split.get("frequency") or {}, split.get("attribute") or {}
    paths = split.get("path")
    if paths is None:  # ImageNet-GLT: the keys are the image paths
        return [(p, int(c), int(freq.get(p, -1)), int(attr.get(p, -1))) for p, c in labels.items()]
    if not isinstance(paths, dict):
        raise DataError(f"{where}: 'path' must map each object id to its image file, got {type(paths).__name__}")
    missing = [k for k in labels if k not in paths]
    if missing:
        raise DataError(f"{where}: {len(missing)} object ids of 'label' have no 'path', e.g. {missing[0]!r}")
    # MSCOCO-GLT: the keys are object ids; each one's crop is looked up in 'path' (as DT_COCO_LT.load_img_info).
    return [(str(paths[k]), int(c), int(freq.get(k, -1)), int(attr.get(k, -1))) for k, c in labels.items()]


def _rewriter(first: str, root: Path, prefix: str | None):
    """A function mapping the file's paths onto ``root``."""
    if prefix is not None:
        def strip(p: str) -> Path:
            if not p.startswith(prefix):
                raise DataError(f"path {p!r} does not start with data.options.path_prefix {prefix!r}")
            return root / p[len(prefix):].lstrip("/\\")
        return strip
    parts = Path(first).parts
    for k in range(len(parts)):  # the shortest tail that exists under root, e.g. n01440764/x.JPEG
        tail = Path(*parts[k:]) if parts[k:] else None
        if tail is not None and not tail.is_absolute() and (root / tail).is_file():
            return lambda p, k=k: root / Path(*Path(p).parts[k:])
    if Path(first).is_file():
        return Path
    raise DataError(f"cannot place {first!r} under data.root {root}: no tail of it exists there; set "
                    f"data.options.path_prefix to the part to strip (the authors' machine prefix)")


def read_glt_annotations(path: str | Path, root: str | Path, path_prefix: str | None = None,
                         check_files: bool = True, allow_outside_root: bool = False) -> dict:
    """Parse a GLT annotation file; returns ``{"class_names", "splits": {name: Split}, "class_groups",
    "protocols"}`` with paths placed under ``root`` (a path that lands outside it, by ``../`` or as an absolute
    path elsewhere, is an error unless ``allow_outside_root``) and (``check_files``) every file checked."""
    path, root = Path(path).expanduser(), Path(root).expanduser()
    if not path.is_file():
        raise DataError(f"GLT annotation file not found: {path} (data.options.annotation)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "train" not in raw:
        raise DataError(f"{path}: not a GLT annotation file (no 'train' split)")
    entries = {SPLIT_NAMES[k]: _entries(raw[k], f"{path} [{k}]") for k in SPLIT_NAMES if k in raw}
    unknown = sorted(set(raw) - set(SPLIT_NAMES) - {"cat2id", "id2cat", "key2path", "meta"})
    if unknown:
        raise DataError(f"{path}: unknown top-level keys {unknown}; expected {sorted(SPLIT_NAMES)}, cat2id, id2cat, "
                        f"key2path")
    if not entries["train"]:
        raise DataError(f"{path}: the train split is empty")
    labels = [c for es in entries.values() for _, c, _, _ in es]
    num_classes = max(labels) + 1
    id2cat = raw.get("id2cat") or {}
    class_names = [str(id2cat.get(str(i), id2cat.get(i, i))) if isinstance(id2cat, dict) else str(i)
                   for i in range(num_classes)]
    place = _rewriter(entries["train"][0][0], root, path_prefix)
    splits, missing = {}, []
    for name, es in entries.items():
        if not es:
            continue
        paths = [str(place(p)) for p, *_ in es]
        outside = [(p, q) for (p, *_), q in zip(es, paths, strict=True) if not inside_root(q, root)]
        if outside and not allow_outside_root:
            raise DataError(f"{path} [{name}]: {len(outside)} image path(s) lie outside data.root {root}, e.g. "
                            f"{outside[0][0]!r} -> {outside[0][1]}; set data.options.path_prefix / data.root so they "
                            f"land inside it, or data.allow_outside_root=true to allow it")
        if check_files:
            missing += [p for p in tqdm(paths, desc=f"checking {name} files", unit="file", leave=False,
                                        mininterval=1.0, disable=bars_off()) if not Path(p).is_file()][:5]
        attrs = torch.tensor([a for *_, a in es])
        splits[name] = Split(targets=torch.tensor([c for _, c, _, _ in es]), paths=paths,
                             attributes=attrs if (attrs >= 0).all() else None)
    if missing:
        raise DataError(f"{path}: image files not found under {root}, e.g. {missing[0]}; check data.root and "
                        f"data.options.path_prefix")
    # Frequency group of each class (0 many / 1 medium / 2 few): the class's group in the training entries.
    groups = torch.full((num_classes,), -1, dtype=torch.int64)
    for _, c, f, _ in entries["train"]:
        groups[c] = f
    class_groups = groups if (groups >= 0).all() else None
    protocols = glt_protocols("lt" if "test_lt" in splits else "cbl", class_split="test_cbl", glt_split="test_gbl")
    return {"class_names": class_names, "splits": splits, "class_groups": class_groups,
            "protocols": {p: s for p, s in protocols.items() if s in splits}}


@dataclass
class GLTConfig:
    """Options of ``imagenet_glt``, ``mscoco_glt`` and ``glt`` (``data.options``)."""

    # The annotation JSON (required): released by the authors, or written by `longtail data glt` / `data coco-glt`.
    # A Train-GLT file (with test_lt) is scored under CLT and GLT, a Train-CBL file under ALT.
    annotation: str | None = None
    # The part of the file's image paths to replace by data.root (the authors' machine prefix); None: the shortest
    # tail of the first path that exists under data.root.
    path_prefix: str | None = None


def _glt_dataset(cfg: DataConfig, opts: GLTConfig, name: str, default_size: int, mean, std) -> LTDataset:
    if not opts.annotation:
        raise DataError(f"{name} needs data.options.annotation: the annotation JSON (released by the authors, or "
                        f"written by `longtail data glt`)")
    if not cfg.root:
        raise DataError(f"{name} needs data.root: the folder the annotation's image paths live under")
    ann = read_glt_annotations(opts.annotation, cfg.root, opts.path_prefix, allow_outside_root=cfg.allow_outside_root)
    size = cfg.image_size or default_size
    splits = ann["splits"]
    check_files(cfg, name, splits, exist=False)  # existence: read_glt_annotations checked every file
    if cfg.in_memory == "always":  # small benchmarks of your own: decode once, augment in batches
        splits = {k: _materialise(v, size, f"{name} {k}", ImageLimits.of(cfg)) for k, v in splits.items()}
    eval_splits = [s for s in ("test_lt", "test_cbl", "test_gbl") if s in splits]
    if not eval_splits:
        raise DataError(f"{opts.annotation}: no test split (test_lt / test_bl / test_bbl)")
    ds = LTDataset(name=name, class_names=ann["class_names"], splits=splits, eval_splits=eval_splits,
                   image_size=size, mean=mean, std=std,
                   attribute_names=["attribute 0 (head)", "attribute 1", "attribute 2 (tail)"],
                   protocols=ann["protocols"], class_groups=ann["class_groups"],
                   info={"root": str(cfg.root), "annotation": str(opts.annotation)})
    ds.validate()
    return ds


@DATASETS.register("imagenet_glt")
@options(GLTConfig)
def imagenet_glt(cfg: DataConfig, opts: GLTConfig, cache_dir: Path) -> LTDataset:
    """ImageNet-GLT from an annotation file (data.options.annotation) over your ILSVRC-2012 train images (data.root)."""
    return _glt_dataset(cfg, opts, "imagenet_glt", 112, IMAGENET_MEAN, IMAGENET_STD)


@DATASETS.register("mscoco_glt")
@options(GLTConfig)
def mscoco_glt(cfg: DataConfig, opts: GLTConfig, cache_dir: Path) -> LTDataset:
    """MSCOCO-GLT from its annotation file (data.options.annotation) over the object crops (data.root)."""
    return _glt_dataset(cfg, opts, "mscoco_glt", 112, COCO_MEAN, COCO_STD)


@DATASETS.register("glt")
@options(GLTConfig)
def glt(cfg: DataConfig, opts: GLTConfig, cache_dir: Path) -> LTDataset:
    """A GLT benchmark of your own images, from the annotation file `longtail data glt` wrote."""
    return _glt_dataset(cfg, opts, "glt", 112, IMAGENET_MEAN, IMAGENET_STD)
