"""Build a GLT benchmark from an image folder with the published procedure (spec glt_ifl.md 2.1).

ImageNet-GLT is this procedure applied to ILSVRC-2012 train; any ``root/<class>/<image>`` folder works:

1. features of every image from a pretrained backbone (ResNet-50 from a LOCAL weights file; Resize(260 s/256),
   CenterCrop(s) with s = 256 by default), cached beside the output;
2. per class, k-means (``clusters`` = 6, seeded) on the features; clusters sorted by size, cluster rank j ->
   attribute group j // (clusters / groups) (3 groups: the 2 largest, the middle 2, the 2 smallest);
3. classes re-indexed by image count (descending); frequency group by class rank (first 40% many, next 45%
   medium, last 15% few, as 400 / 450 / 150 of ImageNet's 1000);
4. per class, in this order: Test-GBL ``min(test_per_class / 3, |group| // 4)`` from each group; Test-CBL
   ``test_per_class`` split 7:2:1 over the groups (each share capped at half of what the group has left, so
   small classes of your own data keep training images; ImageNet classes are never capped); the rest is the pool;
5. Train-GLT file: per-class budgets (an ``exp`` profile of ``imbalance_ratio`` from the largest pool, or the
   natural pool sizes when None), 7:2:1 over groups capped by availability; Test-GLT and val drawn i.i.d. from
   that pool; the rest is train. Train-CBL file: ``cbl_per_class`` per class 7:2:1 (truncated), val 30 per
   class 21/6/3, the rest train; the test sets are shared by both files.

Everything is seeded (k-means included, unlike the reference: spec G3); the seed is written into the files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from longtail.data.base import DataError
from longtail.data.folder import IMAGENET_MEAN, IMAGENET_STD
from longtail.data.images import IMAGE_EXTENSIONS, read_image
from longtail.data.profiles import class_counts
from longtail.utils import atomic_write_json

RATIO = (7, 2, 1)


def split_by_ratio(n: int, ratio=RATIO, truncate: bool = False) -> list[int]:
    """``n`` over the groups in ``ratio``: 60 -> 42/12/6. ``truncate``: floor each share (145 -> 101/29/14)."""
    total = sum(ratio)
    shares = [n * r // total for r in ratio]
    if not truncate:
        shares[0] += n - sum(shares)
    return shares


def scan_folder(root: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names and their image files: ``root/<class>/<image>`` (or ``root/train/<class>/<image>``)."""
    base = root / "train" if (root / "train").is_dir() else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
    if not classes:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/<image>")
    files = [sorted(p for p in (base / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) for c in classes]
    empty = [c for c, f in zip(classes, files, strict=True) if not f]
    if empty:
        raise DataError(f"{base}: classes without images: {', '.join(empty[:5])}")
    return classes, files


class _Images(Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths = paths
        self.t = v2.Compose([v2.Resize(round(size * 260 / 256), antialias=True), v2.CenterCrop(size),
                             v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.t(read_image(self.paths[i]))


@torch.no_grad()
def image_features(paths: list[Path], backbone: str, weights: str | None, size: int, batch_size: int,
                   device: str, num_workers: int) -> np.ndarray:
    """(N, D) float32 features of ``paths`` from a registered backbone with local weights, in eval mode."""
    from longtail.models import load_pretrained
    from longtail.registry import BACKBONES

    net = BACKBONES.get(backbone)()
    if weights:
        load_pretrained(net, weights)
    net = net.to(device).eval()
    dl = DataLoader(_Images(paths, size), batch_size=batch_size, num_workers=num_workers)
    out = []
    for x in tqdm(dl, desc="features", unit="batch"):
        out.append(net(x.to(device)).float().cpu())
    return torch.cat(out).numpy()


def attribute_groups(feats: np.ndarray, clusters: int, groups: int, seed: int) -> np.ndarray:
    """(n,) attribute group of each image of one class: k-means, clusters ranked by size, rank -> group."""
    from sklearn.cluster import KMeans

    k = min(clusters, len(feats))
    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(feats)
    sizes = np.bincount(labels, minlength=k)
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)  # 0 = the largest cluster
    return (rank[labels] * groups // k).astype(np.int64)


def build_glt_benchmark(root: str | Path, out: str | Path, *, name: str = "glt", weights: str | None = None,
                        backbone: str = "resnet50", image_size: int = 256, clusters: int = 6, groups: int = 3,
                        test_per_class: int = 60, val_per_class: int = 30, imbalance_ratio: float | None = None,
                        cbl_per_class: int | None = None, seed: int = 0, batch_size: int = 64,
                        device: str = "cpu", num_workers: int = 2) -> dict:
    """Write ``<out>/<name>_intra_lt_inter_lt.json`` (Train-GLT) and ``..._inter_bl.json`` (Train-CBL).

    Returns a summary: the file paths and each split's size. Image paths in the files are relative to
    ``root`` (read them with ``data.root=ROOT data.annotation=FILE``).
    """
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of class folders")
    if weights is None and backbone == "resnet50":
        raise DataError("the GLT procedure clusters ImageNet-pretrained ResNet-50 features: pass the local "
                        "weights file (e.g. torchvision's resnet50-0676ba61.pth) with --weights")
    out.mkdir(parents=True, exist_ok=True)
    classes, files = scan_folder(root)
    base = root / "train" if (root / "train").is_dir() else root
    paths = [p for f in files for p in f]
    # Features are the slow part: cached, keyed by the file list, backbone, weights and size.
    key = hashlib.sha1("\n".join([backbone, str(weights), str(image_size), *map(str, paths)]).encode()).hexdigest()[:16]
    cache = out / f"{name}_features_{key}.npy"
    if cache.is_file():
        feats = np.load(cache)
    else:
        feats = image_features(paths, backbone, weights, image_size, batch_size, device, num_workers)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(cache)
    rng = np.random.default_rng(seed)
    ratio = RATIO if groups == 3 else (1,) * groups  # 7:2:1 for the published 3 groups, else even shares
    starts = np.cumsum([0] + [len(f) for f in files])
    attr = [attribute_groups(feats[starts[c]:starts[c + 1]], clusters, groups, seed) for c in range(len(classes))]

    order = sorted(range(len(classes)), key=lambda c: (-len(files[c]), classes[c]))  # new id -> old class
    n_cls = len(classes)
    freq = [0 if i < round(0.4 * n_cls) else (1 if i < round(0.85 * n_cls) else 2) for i in range(n_cls)]
    test_gbl, test_cbl, pool = [], [], []  # per new class: (path, attribute) lists; pool per group
    for c in order:
        by_group = [list(rng.permutation(np.flatnonzero(attr[c] == g))) for g in range(groups)]
        gbl = [by_group[g][:min(test_per_class // groups, len(by_group[g]) // 4)] for g in range(groups)]
        by_group = [by_group[g][len(gbl[g]):] for g in range(groups)]
        want = split_by_ratio(test_per_class, ratio)
        cbl = [by_group[g][:min(want[g], len(by_group[g]) // 2)] for g in range(groups)]
        by_group = [by_group[g][len(cbl[g]):] for g in range(groups)]
        test_gbl.append([(files[c][i], g) for g in range(groups) for i in gbl[g]])
        test_cbl.append([(files[c][i], g) for g in range(groups) for i in cbl[g]])
        pool.append([[(files[c][i], g) for i in by_group[g]] for g in range(groups)])

    sizes = [sum(len(g) for g in p) for p in pool]
    budgets = (class_counts(n_cls, max(sizes), imbalance_ratio, "exp") if imbalance_ratio else sizes)
    lt_pool = []
    for p, b in zip(pool, budgets, strict=True):
        want = split_by_ratio(min(b, sum(len(g) for g in p)), ratio)
        lt_pool.append([x for g in range(groups) for x in p[g][:want[g]]])
    flat = [(new, x) for new, items in enumerate(lt_pool) for x in items]
    perm = rng.permutation(len(flat))
    n_test_lt = min(test_per_class * n_cls, len(flat) // 4)
    n_val = min(val_per_class * n_cls, len(flat) // 8)
    test_lt = [flat[i] for i in perm[:n_test_lt]]
    val_lt = [flat[i] for i in perm[n_test_lt:n_test_lt + n_val]]
    train_lt = [flat[i] for i in perm[n_test_lt + n_val:]]

    cbl_n = cbl_per_class or int(np.mean(budgets))
    train_bl, val_bl = [], []
    for new, p in enumerate(pool):
        share = split_by_ratio(min(cbl_n, sum(len(g) for g in p)), ratio,
                               truncate=True)
        vshare = split_by_ratio(val_per_class, ratio)
        for g in range(groups):
            chosen = p[g][:share[g]]
            nv = min(vshare[g], len(chosen) // 4)
            val_bl += [(new, x) for x in chosen[:nv]]
            train_bl += [(new, x) for x in chosen[nv:]]

    def encode(items: list[tuple[int, tuple[Path, int]]]) -> dict:
        split = {"label": {}, "frequency": {}, "attribute": {}}
        for new, (path, g) in items:
            rel = str(path.relative_to(root))
            split["label"][rel], split["frequency"][rel], split["attribute"][rel] = new, freq[new], int(g)
        return split

    per_class = lambda lists: [(new, x) for new, items in enumerate(lists) for x in items]  # noqa: E731
    cat2id = {classes[c]: new for new, c in enumerate(order)}
    common = {"cat2id": cat2id, "id2cat": {str(v): k for k, v in cat2id.items()},
              "test_bl": encode(per_class(test_cbl)), "test_bbl": encode(per_class(test_gbl)),
              "meta": {"seed": seed, "clusters": clusters, "groups": groups, "backbone": backbone,
                       "weights": str(weights), "root": str(base),
                       "procedure": "longtail data glt (spec glt_ifl.md 2.1)"}}
    files_out = {"lt": out / f"{name}_intra_lt_inter_lt.json", "cbl": out / f"{name}_intra_lt_inter_bl.json"}
    lt = {**common, "train": encode(train_lt), "val": encode(val_lt), "test_lt": encode(test_lt)}
    bl = {**common, "train": encode(train_bl), "val": encode(val_bl)}
    for k, d in (("lt", lt), ("cbl", bl)):
        atomic_write_json(files_out[k], d)
    summary = {k: {s: len(d[s]["label"]) for s in ("train", "val", "test_lt", "test_bl", "test_bbl") if s in d}
               for k, d in (("lt", lt), ("cbl", bl))}
    return {"files": {k: str(v) for k, v in files_out.items()}, "sizes": summary, "classes": n_cls}
