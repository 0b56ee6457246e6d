"""Build a GLT benchmark from an image folder with the authors' procedure (spec glt_ifl.md 2.1;
``_ImageNetGeneration/imagenet_glt_generation.py``).

ImageNet-GLT is this procedure applied to ILSVRC-2012 train; any ``root/<class>/<image>`` folder works:

1. features of every image from a pretrained backbone (ResNet-50 from a LOCAL weights file; Resize(260 s/256),
   CenterCrop(s) with s = 256; pixels in [0, 1] without mean / std normalisation, as the reference:
   ``--normalize`` normalises them), cached beside the output;
2. per class, k-means (``clusters`` = 6, seeded) on the features; clusters sorted by size, cluster rank j ->
   attribute group j // (clusters / groups) (3 groups: the 2 largest, the middle 2, the 2 smallest). A group
   lists its images cluster by cluster, each cluster in file order; ``select="front"`` takes images from the front
   of these lists as the reference does, ``"random"`` shuffles each list first (seeded);
3. classes re-indexed by image count (descending); frequency group by class rank (first 40% many, next 45%
   medium, last 15% few, as 400 / 450 / 150 of ImageNet's 1000);
4. per class, in this order: Test-GBL ``a = min(test_per_class / groups, min over groups of |group| // 4)`` from
   EVERY group (one size per class); Test-CBL ``test_per_class`` split 7:2:1 as ``r_i * int(total / 10)``
   (60 -> 42/12/6); what is left is the pool, shared by both files;
5. Train-GLT file: per-class budgets (``--budgets FILE``: the authors' ``long-tail-distribution.pytorch`` gives
   ImageNet-GLT's 1500 -> 18; else an ``exp`` profile of ``imbalance_ratio`` from the largest pool), each split
   7:2:1 by the reference's float32 truncation and capped by what each group has; Test-GLT
   (``test_per_class x C``) and val (``val_per_class x C``) drawn i.i.d. from that pool, exactly these sizes
   while they take at most half of it; the rest is train. Train-CBL file: ``min(cbl_per_class, n)`` per class
   (145: 101/29/14), val ``val_per_class`` per class 7:2:1 (21/6/3) from the front of those, the rest train.

Steps 4-5 are ``glt_splits``, a pure function of the per-class group lists. Everything is seeded (k-means
included, unlike the reference: spec G3); the seed is written into the files. Where the reference would crash
(a group with fewer images than its Test-CBL share), the share is capped at what the group has; Train-CBL's val
takes at most half of a group's share. Neither cap binds on ImageNet (nor on any class with enough images).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
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

RATIO = (7, 2, 1)  # intra-class attribute ratio over groups 0 / 1 / 2 (the reference's intra_dist)


def budget_shares(n: int, ratio=RATIO) -> list[int]:
    """``n`` images over the groups as the reference's ``get_long_tailed_data``: ``((r / sum r) * n).long()`` in
    float32 (145 -> 101/29/14; the shares may sum to less than n)."""
    r = torch.tensor(ratio, dtype=torch.float32)
    return ((r / r.sum()) * n).long().tolist()


def heldout_shares(total: int, ratio=RATIO) -> list[int]:
    """A class-balanced, attribute-long-tailed set of ``total`` per class as the reference's
    ``generate_intra_lt_test``: ``r_i * int(total / sum r)`` (60 -> 42/12/6, 30 -> 21/6/3)."""
    return [r * int(total / sum(ratio)) for r in ratio]


def load_budgets(path: str | Path) -> list[int]:
    """Per-class Train-GLT budgets, largest class first: the reference's ``long-tail-distribution.pytorch`` (a
    ``torch.save``d list), a JSON list, or a text file of integers (whitespace or comma separated)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--budgets {path}: no such file")
    if path.suffix in (".pytorch", ".pt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise DataError(f"--budgets {path}: not a torch.save'd list of integers ({e})") from None
    else:
        text = path.read_text()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raw = text.replace(",", " ").split()
    try:
        values = [int(v) for v in (raw.tolist() if hasattr(raw, "tolist") else raw)]
    except (TypeError, ValueError):
        raise DataError(f"--budgets {path}: expected a list of integers (images per class, largest first)") from None
    if not values or min(values) < 0:
        raise DataError(f"--budgets {path}: expected non-negative integers, one per class")
    if any(a < b for a, b in zip(values, values[1:], strict=False)):  # the reference asserts it too
        raise DataError(f"--budgets {path}: budgets must not increase (class 0 is the largest class)")
    return values


def glt_splits(pools: list[list[list]], budgets: list[int] | Callable[[list[int]], list[int]], *,
               test_per_class: int = 60, val_per_class: int = 30,
               cbl_per_class: int = 145, ratio=RATIO, select: str = "front",
               rng: np.random.Generator | None = None) -> dict:
    """The GLT splits of the reference's ``generate_train_val_test`` (steps 4-5 of the module docstring).

    ``pools[c][g]``: the items (any hashable: paths, ids) of class c's attribute group g, classes in rank order
    (largest first), each list in the order "front" takes from. ``budgets[c]``: class c's Train-GLT budget, or a
    function of the per-class pool sizes left after the test sets that returns them.
    Returns ``{"test_bbl", "test_bl": [(class, item, group)], "lt": {"train", "val", "test_lt": [...]},
    "cbl": {"train", "val": [...]}, "notes": [str]}``.
    """
    if select not in ("front", "random"):
        raise DataError(f"select must be front or random, got '{select}'")
    rng = rng if rng is not None else np.random.default_rng(0)
    n_groups = len(ratio)
    per_group_test = test_per_class // n_groups  # the reference's TEST_SIZE (20)
    cbl_test = heldout_shares(per_group_test * n_groups, ratio)
    cbl_val = heldout_shares((val_per_class // n_groups) * n_groups, ratio)
    if test_per_class > 0 and sum(cbl_test) == 0:
        raise DataError(f"test_per_class {test_per_class}: Test-CBL shares r_i * int({per_group_test * n_groups} / "
                        f"{sum(ratio)}) are all 0 (the reference's arithmetic); use a multiple of "
                        f"{n_groups * sum(ratio)} (the reference: 60)")
    test_bbl, test_bl, pool, notes = [], [], [], []
    for c, groups in enumerate(pools):
        if len(groups) != n_groups:
            raise DataError(f"class {c}: {len(groups)} attribute groups, expected {n_groups}")
        groups = [list(g) if select == "front" else [g[i] for i in rng.permutation(len(g))] for g in groups]
        a = min(per_group_test, *(len(g) // 4 for g in groups))  # one Test-GBL size for every group of the class
        test_bbl += [(c, x, g) for g in range(n_groups) for x in groups[g][:a]]
        groups = [grp[a:] for grp in groups]
        share = [min(s, len(grp)) for s, grp in zip(cbl_test, groups, strict=True)]
        if share != cbl_test:
            notes.append(f"class {c}: Test-CBL capped at {share} (the groups have too few images)")
        test_bl += [(c, x, g) for g in range(n_groups) for x in groups[g][:share[g]]]
        pool.append([grp[s:] for s, grp in zip(share, groups, strict=True)])

    # Train-GLT: budgets split over groups and capped by availability, then Test-GLT and val i.i.d. from it.
    if callable(budgets):
        budgets = budgets([sum(len(grp) for grp in groups) for groups in pool])
    if len(budgets) != len(pools):
        raise DataError(f"{len(budgets)} budgets for {len(pools)} classes: the profile needs one per class "
                        f"(the ImageNet-GLT profile is for ImageNet's 1000 classes)")
    lt_pool = []
    for c, (groups, b) in enumerate(zip(pool, budgets, strict=True)):
        keep = [min(s, len(grp)) for s, grp in zip(budget_shares(b, ratio), groups, strict=True)]
        lt_pool += [(c, x, g) for g in range(n_groups) for x in groups[g][:keep[g]]]
    n_test, n_val = test_per_class * len(pools), val_per_class * len(pools)
    if n_test + n_val > len(lt_pool) // 2:  # keep at least half of the pool for training
        room = len(lt_pool) // 2
        n_test, n_val = room * n_test // max(n_test + n_val, 1), room * n_val // max(n_test + n_val, 1)
        notes.append(f"Test-GLT / val reduced to {n_test} / {n_val}: the Train-GLT pool has {len(lt_pool)} images")
    perm = rng.permutation(len(lt_pool))
    lt = {"test_lt": [lt_pool[i] for i in perm[:n_test]], "val": [lt_pool[i] for i in perm[n_test:n_test + n_val]],
          "train": [lt_pool[i] for i in np.sort(perm[n_test + n_val:])]}  # train in pool order

    # Train-CBL: min(cbl_per_class, n) per class split over groups, val 7:2:1 from the front of each group's share.
    cbl = {"train": [], "val": []}
    for c, groups in enumerate(pool):
        b = min(cbl_per_class, sum(len(grp) for grp in groups))
        for g, (s, grp) in enumerate(zip(budget_shares(b, ratio), groups, strict=True)):
            chosen = grp[:min(s, len(grp))]
            nv = min(cbl_val[g], len(chosen) // 2)  # never more val than train (ImageNet: 21/6/3 of 101/29/14)
            cbl["val"] += [(c, x, g) for x in chosen[:nv]]
            cbl["train"] += [(c, x, g) for x in chosen[nv:]]
    return {"test_bbl": test_bbl, "test_bl": test_bl, "lt": lt, "cbl": cbl, "notes": notes}


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
    def __init__(self, paths: list[Path], size: int, normalize: bool) -> None:
        self.paths = paths
        steps = [v2.Resize(round(size * 260 / 256), antialias=True), v2.CenterCrop(size),
                 v2.ToDtype(torch.float32, scale=True)]
        # The reference feeds ToTensor() pixels in [0, 1] to the ImageNet-trained ResNet-50 (no Normalize).
        self.t = v2.Compose(steps + ([v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else []))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.t(read_image(self.paths[i]))


@torch.no_grad()
def image_features(paths: list[Path], backbone: str, weights: str | None, size: int, batch_size: int,
                   device: str, num_workers: int, normalize: bool = False) -> np.ndarray:
    """(N, D) float32 features of ``paths`` from a registered backbone with local weights, in eval mode."""
    from longtail.models import load_pretrained
    from longtail.registry import BACKBONES

    with torch.random.fork_rng(devices=[]):  # a backbone without weights file: the same random net every build
        torch.manual_seed(0)
        net = BACKBONES.get(backbone)()
    if weights:
        load_pretrained(net, weights)
    net = net.to(device).eval()
    dl = DataLoader(_Images(paths, size, normalize), batch_size=batch_size, num_workers=num_workers)
    out = []
    for x in tqdm(dl, desc="features", unit="batch"):
        out.append(net(x.to(device)).float().cpu())
    return torch.cat(out).numpy()


def cluster_ranks(feats: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, int]:
    """(n,) size rank of each image's k-means cluster (0 = the largest) of one class, and the cluster count."""
    from sklearn.cluster import KMeans

    k = min(clusters, len(feats))
    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(feats)
    sizes = np.bincount(labels, minlength=k)
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)
    return rank[labels], k


def attribute_groups(feats: np.ndarray, clusters: int, groups: int, seed: int) -> np.ndarray:
    """(n,) attribute group of each image of one class: k-means, clusters ranked by size, rank -> group."""
    ranks, k = cluster_ranks(feats, clusters, seed)
    return (ranks * groups // k).astype(np.int64)


def group_lists(ranks: np.ndarray, k: int, groups: int) -> list[list[int]]:
    """Per group, the image indices cluster by cluster (largest first), each cluster in file order: the lists the
    reference pops from (``cluster_ranking`` concatenates the 2 clusters of a group)."""
    order = np.lexsort((np.arange(len(ranks)), ranks))  # by cluster rank, then file order
    g_of = ranks[order] * groups // k
    return [order[g_of == g].tolist() for g in range(groups)]


def build_glt_benchmark(root: str | Path, out: str | Path, *, name: str = "glt", weights: str | None = None,
                        backbone: str = "resnet50", image_size: int = 256, clusters: int = 6, groups: int = 3,
                        test_per_class: int = 60, val_per_class: int = 30, budgets: str | Path | None = None,
                        imbalance_ratio: float = 20.0, cbl_per_class: int = 145, select: str = "front",
                        normalize: bool = False, seed: int = 0, batch_size: int = 64, device: str = "cpu",
                        num_workers: int = 2) -> dict:
    """Write ``<out>/<name>_intra_lt_inter_lt.json`` (Train-GLT) and ``..._inter_bl.json`` (Train-CBL).

    ``budgets``: a file of per-class Train-GLT budgets (``load_budgets``); without one, an ``exp`` profile of
    ``imbalance_ratio`` from the largest pool (20: the reference script's own ``exp`` alternative, imb_factor
    0.05). Returns a summary: the file paths, each split's size and notes. Image paths in the files are relative
    to ``root`` (read them with ``data.root=ROOT data.options.annotation=FILE``).
    """
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of class folders")
    if weights is None and backbone == "resnet50":
        raise DataError("the GLT procedure clusters ImageNet-pretrained ResNet-50 features: pass the local "
                        "weights file (e.g. torchvision's resnet50-0676ba61.pth) with --weights")
    profile = load_budgets(budgets) if budgets is not None else None
    out.mkdir(parents=True, exist_ok=True)
    classes, files = scan_folder(root)
    base = root / "train" if (root / "train").is_dir() else root
    paths = [p for f in files for p in f]
    # Features are the slow part: cached, keyed by the file list, backbone, weights, size and normalisation.
    key = hashlib.sha1("\n".join([backbone, str(weights), str(image_size), f"normalize={normalize}",
                                  *map(str, paths)]).encode()).hexdigest()[:16]
    cache = out / f"{name}_features_{key}.npy"
    if cache.is_file():
        feats = np.load(cache)
    else:
        feats = image_features(paths, backbone, weights, image_size, batch_size, device, num_workers, normalize)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(cache)
    ratio = RATIO if groups == 3 else (1,) * groups  # 7:2:1 for the published 3 groups, else even shares
    starts = np.cumsum([0] + [len(f) for f in files])
    order = sorted(range(len(classes)), key=lambda c: (-len(files[c]), classes[c]))  # new id -> old class
    n_cls = len(classes)
    pools = []
    for c in order:
        ranks, k = cluster_ranks(feats[starts[c]:starts[c + 1]], clusters, seed)
        pools.append([[files[c][i] for i in lst] for lst in group_lists(ranks, k, groups)])
    if profile is None:  # the reference's exp branch, n_max the largest pool (the reference: ImageNet's fixed 1800)
        def profile(sizes: list[int]) -> list[int]:
            return [min(b, n) for b, n in zip(class_counts(n_cls, max(sizes), imbalance_ratio, "exp"), sizes,
                                              strict=True)]
    res = glt_splits(pools, profile, test_per_class=test_per_class, val_per_class=val_per_class,
                     cbl_per_class=cbl_per_class, ratio=ratio, select=select, rng=np.random.default_rng(seed))
    freq = [0 if i < round(0.4 * n_cls) else (1 if i < round(0.85 * n_cls) else 2) for i in range(n_cls)]

    def encode(items: list[tuple[int, Path, int]]) -> dict:
        split = {"label": {}, "frequency": {}, "attribute": {}}
        for new, path, g in items:
            rel = str(path.relative_to(root))
            split["label"][rel], split["frequency"][rel], split["attribute"][rel] = new, freq[new], int(g)
        return split

    cat2id = {classes[c]: new for new, c in enumerate(order)}
    common = {"cat2id": cat2id, "id2cat": {str(v): k for k, v in cat2id.items()},
              "test_bl": encode(res["test_bl"]), "test_bbl": encode(res["test_bbl"]),
              "meta": {"seed": seed, "clusters": clusters, "groups": groups, "backbone": backbone,
                       "weights": str(weights), "root": str(base), "normalize": normalize, "select": select,
                       "budgets": str(budgets) if budgets is not None else f"exp, imbalance ratio {imbalance_ratio}",
                       "procedure": "longtail data glt (spec glt_ifl.md 2.1)"}}
    files_out = {"lt": out / f"{name}_intra_lt_inter_lt.json", "cbl": out / f"{name}_intra_lt_inter_bl.json"}
    lt = {**common, **{k: encode(v) for k, v in res["lt"].items()}}
    bl = {**common, **{k: encode(v) for k, v in res["cbl"].items()}}
    for k, d in (("lt", lt), ("cbl", bl)):
        atomic_write_json(files_out[k], d)
    summary = {k: {s: len(d[s]["label"]) for s in ("train", "val", "test_lt", "test_bl", "test_bbl") if s in d}
               for k, d in (("lt", lt), ("cbl", bl))}
    return {"files": {k: str(v) for k, v in files_out.items()}, "sizes": summary, "classes": n_cls,
            "notes": res["notes"]}
