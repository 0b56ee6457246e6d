"""Build MSCOCO-GLT from COCO 2014 and COCO-Attributes with the authors' procedure (spec glt_ifl.md 2.2;
``_COCOGeneration/mscoco_glt_generation.py`` then ``mscoco_glt_crop.py``).

1. Objects: every COCO-Attributes object (204 attribute votes; an attribute is positive when its vote is > 0.5)
   joined with its COCO 2014 train+val instance (category, image, box): 29 classes, 188,426 objects on the real
   files. Classes ranked by size; ranks 0-10 many, 11-22 medium, the rest few (as fractions 11/29, 23/29 of the
   class count for other data).
2. Per file, from the full object set, in this order: Test-GBL, per class N objects chosen greedily, each the
   remaining object (with >= 1 positive attribute) that minimises ``std(normalise(z_sum + z))``,
   ``normalise(v) = v / (sum v + 1e-9)`` (first minimum in file order, as the reference); Test-CBL, N random
   objects per class; train, the classes re-ranked by what is left, Train-GLT
   ``min(int(n_max * 0.005^(i / (C - 1))), n_i)`` random objects (``imbalance_factor``) and Train-CBL the smallest
   class's count for every class; Test-GLT (Train-GLT file only) ``N x C`` and val ``N/2 x C`` objects drawn
   i.i.d. from the train set (at most half of it). N = 200 for Train-GLT, 100 for Train-CBL.
3. Per split, each object's attribute group: score = <normalise(train positive-attribute counts of its class),
   normalise(its positive attributes)>; above the split's upper tercile -> 0, above the lower -> 1, else 2.
4. Crops: the box widened by 50 px per side where that side is under 100 px, else by 20 % of it, clipped to the
   image, then padded to a square (the padding black, as PIL's crop outside the image), saved as JPEG (PIL's
   default quality 75) at ``<out>/images/<object id>.jpg``.

Output: ``<out>/coco_intra_lt_inter_lt/annotation.json`` (Train-GLT: CLT, GLT) and
``<out>/coco_intra_lt_inter_bl/annotation.json`` (Train-CBL: ALT) in the layout ``mscoco_glt_crop.py`` writes
(fields keyed by object id, ``path`` relative to ``<out>``; read with ``data.root=<out>``), one shared crop folder.

Differences from the reference, on purpose: everything is drawn from one seeded NumPy generator (the reference's
unseeded script and set-ordered classes cannot be re-run to the released files: spec G3), so a seed reproduces our
files, not the released ones; a step that would make the reference loop forever or crash (too few objects for a
test set) is capped and reported; crops are saved as RGB.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from longtail.data.base import DataError
from longtail.utils import atomic_write_json

FREQ_FRACTIONS = (11 / 29, 23 / 29)  # MSCOCO-GLT's 11 many / 12 medium / 6 few of 29 classes


# ----------------------------------------------------------------------------- inputs


def load_coco_instances(coco_root: str | Path) -> tuple[dict[int, dict], dict[int, Path], dict[int, str]]:
    """COCO 2014 train+val instances: ({annotation id: annotation}, {image id: file}, {category id: name}).

    Reads ``COCO_ROOT/annotations/instances_{train,val}2014.json`` (at least one) and finds each image under
    ``COCO_ROOT/{train2014,val2014}/`` or ``COCO_ROOT/images/{train2014,val2014}/``."""
    root = Path(coco_root).expanduser()
    files = [root / "annotations" / f"instances_{s}2014.json" for s in ("train", "val")]
    if not any(f.is_file() for f in files):
        raise DataError(f"{root}: no annotations/instances_train2014.json or instances_val2014.json (COCO 2014)")
    anns, images, cats = {}, {}, {}
    for f in files:
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{f}: not valid JSON ({e})") from None
        split = f.stem.split("_")[1]  # train2014 / val2014
        folders = [root / split, root / "images" / split]
        for img in data.get("images", []):
            here = [d / img["file_name"] for d in folders]
            images[int(img["id"])] = next((p for p in here if p.is_file()), here[0])
        for c in data.get("categories", []):
            cats[int(c["id"])] = str(c["name"])
        for a in data.get("annotations", []):
            anns[int(a["id"])] = a
    return anns, images, cats


def load_attributes(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """COCO-Attributes: ({object key: (A,) attribute votes}, {object key: COCO annotation id}).

    Accepted, by what the file holds:
    - the authors' documented layout (genp/cocottributes ``DATA.md``), as their pickled ``.jbl`` / ``.pkl`` (read
      with joblib: a pickle, so only load the file the COCO-Attributes or GLT authors publish) or the same dict as
      JSON: ``ann_vecs`` {patch id: votes}, ``patch_id_to_ann_id`` {patch id: COCO annotation id}, ``attributes``
      [{id, name}] (the votes follow the attributes sorted by id); the object key is the patch id, as the GLT code;
    - the same document's second layout: ``ann_attrs`` {COCO annotation id: {attrs_vector, split}};
    - a plain JSON ``{COCO annotation id: [votes]}`` (not a format of the COCO-Attributes authors; for data
      converted by hand). The object key is then the annotation id.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"COCO-Attributes file not found: {path}")
    if path.suffix in (".jbl", ".pkl", ".joblib", ".pickle"):
        import joblib

        raw = joblib.load(path)
    else:
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: neither JSON nor a .jbl / .pkl pickle ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a mapping (ann_vecs / ann_attrs / annotation id -> votes)")
    if "ann_vecs" in raw:
        if "patch_id_to_ann_id" not in raw:
            raise DataError(f"{path}: has ann_vecs but no patch_id_to_ann_id (the COCO annotation of each patch)")
        vecs = {str(k): np.asarray(v, dtype=np.float64) for k, v in raw["ann_vecs"].items()}
        to_ann = {str(k): int(v) for k, v in raw["patch_id_to_ann_id"].items()}
        missing = [k for k in vecs if k not in to_ann]
        if missing:
            raise DataError(f"{path}: {len(missing)} patches of ann_vecs have no patch_id_to_ann_id, e.g. {missing[0]}")
    elif "ann_attrs" in raw:
        vecs = {str(k): np.asarray(v["attrs_vector"], dtype=np.float64) for k, v in raw["ann_attrs"].items()}
        to_ann = {k: int(k) for k in vecs}
    else:
        try:
            vecs = {str(int(k)): np.asarray(v, dtype=np.float64) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise DataError(f"{path}: not COCO-Attributes (no ann_vecs / ann_attrs) nor a plain "
                            f"{{annotation id: [votes]}} mapping") from None
        to_ann = {k: int(k) for k in vecs}
    sizes = {v.shape for v in vecs.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise DataError(f"{path}: attribute vectors must all have the same length, got shapes {sorted(sizes)[:3]}")
    return vecs, to_ann


# ----------------------------------------------------------------------------- the splits


def normalise(v: np.ndarray) -> np.ndarray:
    """v / (sum v + 1e-9) along the last axis (the reference's ``normalize_vector``)."""
    return v / (v.sum(-1, keepdims=True) + 1e-9)


def balanced_pick(positives: np.ndarray, n: int) -> list[int]:
    """Row indices of ``positives`` ((m, A) 0/1) chosen greedily to keep the attribute histogram flattest: each
    step adds the row (with >= 1 positive, not yet chosen) minimising std(normalise(sum + row)); ties go to the
    first row, as the reference's strict ``<`` over the class's objects in order."""
    z_sum = np.zeros(positives.shape[1])
    open_ = positives.sum(1) > 0
    chosen = []
    for _ in range(n):
        if not open_.any():
            break
        std = normalise(z_sum + positives).std(1)  # (m,) population std, as numpy's default in the reference
        std[~open_] = np.inf
        j = int(np.argmin(std))
        chosen.append(j)
        open_[j] = False
        z_sum += positives[j]
    return chosen


def coco_glt_splits(classes: list[list[str]], positives: dict[str, np.ndarray], *, variant: str, test_size: int,
                    val_size: int, imbalance_factor: float, rng: np.random.Generator) -> tuple[dict, list[str]]:
    """One file's splits (``variant`` lt: Train-GLT, bl: Train-CBL) of ``classes[c]``: the object keys of class c
    (rank order, each in file order). Returns ({split: [(class, key)]}, notes)."""
    notes = []
    left = [list(keys) for keys in classes]
    out = {s: [] for s in ("train", "val", "test_lt", "test_bl", "test_bbl")}
    for c, keys in enumerate(left):  # Test-GBL: attribute-balanced by minimal histogram std
        pos = np.stack([positives[k] for k in keys]) if keys else np.zeros((0, 1))
        pick = balanced_pick(pos, test_size)
        if len(pick) < test_size:
            notes.append(f"class {c}: Test-GBL holds {len(pick)} of {test_size} (too few objects with attributes)")
        out["test_bbl"] += [(c, keys[j]) for j in pick]
        taken = set(pick)
        left[c] = [k for j, k in enumerate(keys) if j not in taken]
    for c, keys in enumerate(left):  # Test-CBL: random
        n = min(test_size, len(keys) // 2)
        if n < test_size:
            notes.append(f"class {c}: Test-CBL holds {n} of {test_size} (too few objects)")
        idx = rng.permutation(len(keys))
        out["test_bl"] += [(c, keys[j]) for j in idx[:n]]
        left[c] = [keys[j] for j in sorted(idx[n:])]
    # Train: classes re-ranked by what is left (the reference's generate_data sorts again), then drawn at random.
    order = sorted(range(len(left)), key=lambda c: -len(left[c]))
    sizes = [len(left[c]) for c in order]
    if variant == "lt":
        want = [min(int(sizes[0] * imbalance_factor ** (i / max(len(sizes) - 1, 1))), n) for i, n in enumerate(sizes)]
    else:
        want = [min(sizes)] * len(sizes)
    train = []
    for c, n in zip(order, want, strict=True):
        idx = rng.permutation(len(left[c]))[:n]
        train += [(c, left[c][j]) for j in idx]
    # Test-GLT and val: i.i.d. from the train set, at most half of it together.
    n_test = test_size * len(classes) if variant == "lt" else 0
    n_val = val_size * len(classes)
    if n_test + n_val > len(train) // 2:
        room = len(train) // 2
        n_test, n_val = room * n_test // (n_test + n_val), room * n_val // (n_test + n_val)
        notes.append(f"Test-GLT / val reduced to {n_test} / {n_val}: the train set has {len(train)} objects")
    perm = rng.permutation(len(train))
    out["test_lt"] = [train[i] for i in perm[:n_test]]
    out["val"] = [train[i] for i in perm[n_test:n_test + n_val]]
    out["train"] = [train[i] for i in perm[n_test + n_val:]]
    return out, notes


def attribute_fields(split: list[tuple[int, str]], train: list[tuple[int, str]], positives: dict[str, np.ndarray],
                     num_classes: int) -> dict:
    """``attribute`` (0 / 1 / 2 by terciles of the frequent-attribute score), ``attribute_score`` and
    ``attribute_dist`` of a split, as ``mscoco_glt_crop.py``'s ``generate_images_labels``."""
    dim = len(next(iter(positives.values())))
    train_count = np.zeros((num_classes, dim))
    for c, k in train:
        train_count[c] += positives[k]
    dist = np.zeros((num_classes, dim))
    for c, k in split:
        dist[c] += positives[k]
    base = normalise(train_count)
    score = {k: float((base[c] * normalise(positives[k])).sum()) for c, k in split}
    ranked = sorted(score.values(), reverse=True)
    high_mid, mid_low = ranked[len(ranked) // 3], ranked[len(ranked) // 3 * 2]
    group = {k: 0 if s > high_mid else (1 if s > mid_low else 2) for k, s in score.items()}
    return {"attribute": group, "attribute_score": score,
            "attribute_dist": {str(c): dist[c].tolist() for c in range(num_classes)}}


# ----------------------------------------------------------------------------- crops


def crop_box(bbox: list[float], width: int, height: int) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of an object's crop: each side widened by 50 px if it is under 100 px, else by 20 %,
    clipped to the image (``print_coco_attributes_instance``)."""
    x, y, w, h = (float(v) for v in bbox)
    x1, x2 = (max(x - 50, 0), min(x + 50 + w, width)) if w < 100 else (max(x - 0.2 * w, 0), min(x + 1.2 * w, width))
    y1, y2 = (max(y - 50, 0), min(y + 50 + h, height)) if h < 100 else (max(y - 0.2 * h, 0), min(y + 1.2 * h, height))
    return x1, y1, x2, y2


def save_crop(image_path: Path, bbox: list[float], out: Path) -> None:
    """Crop, pad to a square (black outside the image: PIL's crop) and save as JPEG."""
    from PIL import Image

    try:
        with Image.open(image_path) as im:
            img = im.crop(crop_box(bbox, *im.size))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read COCO image {image_path}: {e}") from None
    w, h = img.size
    pad = (max(w, h) - min(w, h)) / 2
    img = img.crop((0, -pad, w, h + pad)) if w > h else img.crop((-pad, 0, w + pad, h))
    tmp = out.with_suffix(".tmp.jpg")
    img.convert("RGB").save(tmp, format="JPEG")
    tmp.replace(out)


# ----------------------------------------------------------------------------- the builder


def build_coco_glt(coco_root: str | Path, attributes: str | Path, out: str | Path, *, seed: int = 25,
                   test_per_class: int = 200, val_per_class: int = 100, imbalance_factor: float = 0.005,
                   crops: bool = True) -> dict:
    """Write MSCOCO-GLT (module docstring) under ``out``; returns the files, split sizes, classes and notes.

    ``test_per_class`` / ``val_per_class`` are the Train-GLT file's N (200 / 100); the Train-CBL file uses half.
    """
    out = Path(out).expanduser()
    vecs, to_ann = load_attributes(attributes)
    anns, images, cats = load_coco_instances(coco_root)
    objects, unmatched = [], 0
    for key, ann_id in to_ann.items():
        if key not in vecs:
            continue
        ann = anns.get(ann_id)
        if ann is None or int(ann["category_id"]) not in cats:
            unmatched += 1
            continue
        objects.append((key, cats[int(ann["category_id"])], ann))
    if not objects:
        raise DataError(f"no object of {attributes} is a COCO 2014 instance under {coco_root}")
    by_cat: dict[str, list[str]] = {}
    for key, cat, _ in objects:
        by_cat.setdefault(cat, []).append(key)
    names = sorted(by_cat, key=lambda c: (-len(by_cat[c]), c))  # class id = size rank (the reference's CAT2ID)
    n_cls = len(names)
    many, medium = round(FREQ_FRACTIONS[0] * n_cls), round(FREQ_FRACTIONS[1] * n_cls)
    freq = [0 if i < many else (1 if i < medium else 2) for i in range(n_cls)]
    classes = [by_cat[c] for c in names]
    positives = {k: (vecs[k] > 0.5).astype(np.float64) for k, _, _ in objects}
    cat2id = {c: i for i, c in enumerate(names)}
    notes = [f"{unmatched} attribute objects have no COCO 2014 instance (skipped)"] if unmatched else []
    files, sizes, used = {}, {}, set()
    for variant, folder, scale in (("lt", "coco_intra_lt_inter_lt", 1), ("bl", "coco_intra_lt_inter_bl", 2)):
        rng = np.random.default_rng([seed, 0 if variant == "lt" else 1])
        splits, vnotes = coco_glt_splits(classes, positives, variant=variant, test_size=test_per_class // scale,
                                         val_size=val_per_class // scale, imbalance_factor=imbalance_factor, rng=rng)
        notes += [f"{folder}: {n}" for n in vnotes]
        ann_out = {"cat2id": cat2id, "id2cat": {str(i): c for c, i in cat2id.items()}, "key2path": {}}
        for name, items in splits.items():
            split = {"label": {k: c for c, k in items}, "frequency": {k: freq[c] for c, k in items},
                     "attribute": {}, "path": {k: f"images/{k}.jpg" for _, k in items}, "attribute_score": {}}
            if items:  # the reference leaves a skipped split's fields empty and writes no attribute_dist
                split.update(attribute_fields(items, splits["train"], positives, n_cls))
            ann_out[name] = split
            used.update(k for _, k in items)
        ann_out["meta"] = {"seed": seed, "procedure": "longtail data coco-glt (spec glt_ifl.md 2.2)",
                           "test_per_class": test_per_class // scale, "val_per_class": val_per_class // scale,
                           "imbalance_factor": imbalance_factor,
                           "attribute_std": {s: attribute_std([k for _, k in v], positives)
                                             for s, v in splits.items() if v}}
        files[variant] = out / folder / "annotation.json"
        files[variant].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(files[variant], ann_out)
        sizes[variant] = {s: len(v) for s, v in splits.items() if v or s != "test_lt"}
    if crops:
        (out / "images").mkdir(parents=True, exist_ok=True)
        info = {k: a for k, _, a in objects}
        for key in tqdm(sorted(used), desc="crops", unit="object", mininterval=1.0):
            target = out / "images" / f"{key}.jpg"
            if not target.is_file():  # resumable: a crop depends only on its object
                ann = info[key]
                save_crop(images[int(ann["image_id"])], ann["bbox"], target)
    return {"files": {k: str(v) for k, v in files.items()}, "sizes": sizes, "classes": names, "notes": notes}


def attribute_std(keys: list[str], positives: dict[str, np.ndarray]) -> float:
    """Std of the split's normalised positive-attribute histogram (the notebook's imbalance measure)."""
    return float(normalise(np.sum([positives[k] for k in keys], axis=0)).std()) if keys else 0.0
