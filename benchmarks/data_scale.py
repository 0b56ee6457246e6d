"""Scale on paper and by simulation: file loading against DataLoader workers, the in-memory path's memory against
dataset size, and which shipped benchmarks fit the in-memory path on a machine of a given RAM.

    python benchmarks/data_scale.py                  # all three; about 5 minutes on a quiet 2-core machine
    python benchmarks/data_scale.py --only table     # the table alone, from the formula (instant)

- loading: a synthetic image folder (``--folder``, made once if missing: ``--images`` small JPEGs of 32-64 px
  a side in a long-tailed class profile, seeded; under /tmp, never committed) read through longtail's file path
  (``image_folder`` with ``data.in_memory=never``: DataLoader workers decode with torchvision.io and transform
  per image, batches of ``--batch-size``), images/s with ``data.num_workers`` = each of ``--workers``, no model.
  Interleaved: every round times every worker count once (a fresh Loader each time, its workers started and
  warmed up by ``--warmup`` batches before ``--batches`` timed ones, then stopped), the 1-minute load average
  read before and after each round; medians over ``--rounds``.
- memory: the in-memory path (``data.in_memory=always``: every split decoded once into one uint8 tensor at
  ``data.image_size``) at a few dataset sizes and image sizes, each in a fresh process: its resident memory
  before and after building the dataset, the images tensor's bytes, and a least-squares fit of the growth per
  image against the formula 3 S^2 bytes (+ the label).
- table: for each shipped benchmark, the images of all its splits at the image size its recipes use, the
  formula's host memory, and whether that fits the in-memory path on a ``--ram-gib`` machine (default 24) with
  ``--headroom-gib`` left for the process, the model and the OS (default 4), or needs file loading.

One record, ``benchmarks/results/data_scale_cpu.json`` (``--out``): command, commit, CPU model, torch, seed, load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from cpu_defaults import cpu_model, load  # noqa: E402  (the same readings as the other CPU records)

# Every shipped benchmark: its splits' sizes (the lists / annotation files longtail reads; spec baselines.md and
# glt_ifl.md), and the image side its recipes store (configs/*: data.image_size, else the dataset's default).
SHIPPED = [
    {"benchmark": "CIFAR-10-LT (r=100)", "recipes": "configs/cifar10_lt/", "size": 32,
     "splits": {"train": 12406, "test": 10000}},
    {"benchmark": "CIFAR-100-LT (r=100)", "recipes": "configs/cifar100_lt/", "size": 32,
     "splits": {"train": 10847, "test": 10000}},
    {"benchmark": "ImageNet-LT", "recipes": "configs/imagenet_lt/", "size": 224,
     "splits": {"train": 115846, "val": 20000, "test": 50000}},
    {"benchmark": "Places-LT", "recipes": "configs/places_lt/", "size": 224,
     "splits": {"train": 62500, "val": 7300, "test": 36500}},
    {"benchmark": "iNaturalist 2018", "recipes": "configs/inat2018/", "size": 224,
     "splits": {"train": 437513, "test": 24426}},
    {"benchmark": "ImageNet-GLT (Train-GLT file)", "recipes": "configs/imagenet_glt/", "size": 112,
     "splits": {"train": 113460, "val": 30000, "test_lt": 60000, "test_cbl": 60000, "test_gbl": 60000}},
    {"benchmark": "MSCOCO-GLT (Train-GLT file)", "recipes": "configs/mscoco_glt/", "size": 112,
     "splits": {"train": 144573, "val": 2900, "test_lt": 5800, "test_cbl": 5800, "test_gbl": 5800}},
]
LABEL_BYTES = 8  # int64 target per image (GLT splits also hold an int64 attribute: 8 more)


def per_image_bytes(size: int, extra: int = LABEL_BYTES) -> int:
    """Host bytes per image of the in-memory path: one (3, S, S) uint8 image and its label."""
    return 3 * size * size + extra


# ----------------------------------------------------------------------------- the synthetic folder


def make_folder(folder: Path, images: int, classes: int, imbalance: float, seed: int) -> dict:
    """``folder``/train/<class>/<i>.jpg in an exp profile summing to about ``images``, and 10 test images per
    class; JPEGs of 32-64 px a side (smooth colour fields with noise, quality 90). Seeded; skipped when a
    finished folder with the same settings is there."""
    import numpy as np
    from PIL import Image

    from longtail.data.profiles import class_counts

    stamp = folder / "MADE.json"
    want = {"images": images, "classes": classes, "imbalance": imbalance, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()).get("settings") == want:
        return json.loads(stamp.read_text())
    r = 1.0 / imbalance
    n_max = round(images / sum(r ** (i / (classes - 1)) for i in range(classes)))
    counts = class_counts(classes, n_max, imbalance)
    rng = np.random.default_rng(seed)
    t = time.time()
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 64
    for split, per in (("train", counts), ("test", [10] * classes)):
        for c, n in enumerate(per):
            d = folder / split / f"c{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.uniform(40, 215, (classes, 3))[c]
            for i in range(n):
                h, w = rng.integers(32, 65, 2)
                grad = rng.uniform(-60, 60, 3)
                img = base + grad * (xx[:h, :w, None] + yy[:h, :w, None]) / 2
                img = img + rng.normal(0, 12, (h, w, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    files = sorted(folder.rglob("*.jpg"))
    info = {"settings": want, "train_images": sum(counts), "test_images": 10 * classes,
            "class_counts": {"max": counts[0], "min": counts[-1]},
            "mean_file_bytes": round(sum(f.stat().st_size for f in files) / len(files), 1),
            "seconds_to_make": round(time.time() - t, 1)}
    stamp.write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- loading throughput


def time_loading(folder: Path, workers: int, args) -> dict:
    """Images/s of ``Loader.train_batches`` over the folder's train split with ``workers`` DataLoader workers."""
    import torch

    from longtail.config import DataConfig
    from longtail.data import create_dataset
    from longtail.data.loaders import Loader

    cfg = DataConfig(name="image_folder", root=str(folder), image_size=args.image_size, in_memory="never",
                     augment=args.augment, num_workers=workers, decode_check=0)
    ds = create_dataset(cfg)
    loader = Loader(ds, torch.device("cpu"), cfg.augment, workers, fast_path=True)
    gen = torch.Generator().manual_seed(args.seed + workers)
    # Untimed first: the workers' start and the batches they made while the main process waited for the first
    # ones (each worker keeps prefetch_factor=4 batches in flight), so the timed batches are the steady state.
    warmup = max(args.warmup, 4 * workers + 1)
    n = (warmup + args.batches) * args.batch_size
    indices = torch.randperm(len(ds.train), generator=gen)[:n]
    t0 = time.time()
    it = loader.train_batches(indices, args.batch_size, True, gen)
    for _ in range(warmup):
        next(it)
    started = time.time() - t0
    t, cpu, images = time.time(), time.process_time(), 0
    for x, _y in it:
        images += len(x)
    seconds = time.time() - t
    loader.close()
    return {"workers": workers, "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1), "main_process_cpu_seconds": round(time.process_time() - cpu, 3),
            "warmup_batches": warmup, "start_and_warmup_seconds": round(started, 2),
            "augment": loader.augment}


def section_loading(args) -> dict:
    folder = Path(args.folder)
    made = make_folder(folder, args.images, args.classes, args.imbalance, args.seed)
    rounds = []
    for k in range(args.rounds):
        order = args.workers[k % len(args.workers):] + args.workers[: k % len(args.workers)]
        before = load()
        timed = [time_loading(folder, w, args) for w in order]
        rounds.append({"round": k, "load_1min": {"before": before, "after": load()},
                       "results": sorted(timed, key=lambda r: r["workers"])})
        print(f"  round {k}: " + ", ".join(f"{r['workers']} workers {r['images_per_s']:.0f}/s"
                                           for r in rounds[-1]["results"]), file=sys.stderr, flush=True)
    return {"what": f"images/s of the file path (image_folder, data.in_memory=never, augment {args.augment}, "
                    f"image_size {args.image_size}, batch {args.batch_size}) against data.num_workers, no model",
            "folder": {"path": str(folder), **made}, "batches_timed": args.batches, **loading_medians(rounds),
            "rounds": rounds}


def loading_medians(rounds: list[dict]) -> dict:
    """Median images/s per worker count; and with no workers, images per CPU second of the main process: what
    one core decodes and transforms, whatever share of the cores it got (the steady figure on a busy machine)."""
    workers = sorted({r["workers"] for rnd in rounds for r in rnd["results"]})
    out = {"median_images_per_s_by_workers": {
        str(w): round(statistics.median(r["images_per_s"] for rnd in rounds for r in rnd["results"]
                                        if r["workers"] == w), 1) for w in workers}}
    inline = [r["images"] / r["main_process_cpu_seconds"] for rnd in rounds for r in rnd["results"]
              if r["workers"] == 0 and r["main_process_cpu_seconds"] > 0]
    if inline:
        out["one_core_images_per_cpu_second"] = round(statistics.median(inline), 1)
    return out


# ----------------------------------------------------------------------------- in-memory memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(folder: Path, n: int, size: int) -> dict:
    """In this (fresh) process: RSS before and after the in-memory path decodes a list-file subset of ``n``
    training images (and no test images beyond 10) at ``size``."""
    import resource
    import tempfile

    from longtail.config import DataConfig
    from longtail.data import create_dataset

    files = sorted((folder / "train").rglob("*.jpg"))
    firsts = {}  # one image of every class (list_file refuses a class without training images), then evenly spaced
    for f in files:
        firsts.setdefault(f.parent.name, f)
    rest = [f for f in files if f not in set(firsts.values())]
    chosen = list(firsts.values()) + rest[:: max(1, len(rest) // max(n - len(firsts), 1))][: n - len(firsts)]
    with tempfile.TemporaryDirectory() as tmp:
        train_list = Path(tmp) / "train.txt"
        classes = sorted({p.parent.name for p in files})
        train_list.write_text("".join(f"{p.relative_to(folder)} {classes.index(p.parent.name)}\n" for p in chosen))
        test_list = Path(tmp) / "test.txt"
        tests = sorted((folder / "test").rglob("*.jpg"))[:10]
        test_list.write_text("".join(f"{p.relative_to(folder)} {classes.index(p.parent.name)}\n" for p in tests))
        lists = {"train_list": str(train_list), "test_list": str(test_list)}
        cfg = DataConfig(name="list_file", root=str(folder), options={**lists, "num_classes": len(classes)},
                         image_size=size, in_memory="always", decode_check=0)
        warm = DataConfig(**{**vars(cfg), "options": {**lists, "train_list": str(test_list)}})  # the imports and
        create_dataset(warm)  # first allocations of the path, so that the growth below is the dataset's own
        before = rss_bytes()
        t = time.time()
        ds = create_dataset(cfg)
        seconds = time.time() - t
        after = rss_bytes()
    tensor = sum(s.images.numel() * s.images.element_size() + s.targets.numel() * s.targets.element_size()
                 for s in ds.splits.values())
    return {"images": sum(len(s) for s in ds.splits.values()), "image_size": size, "rss_before": before,
            "rss_after": after, "rss_growth": after - before, "tensor_bytes": tensor,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": round(seconds, 2)}


def section_memory(args) -> dict:
    folder = Path(args.folder)
    make_folder(folder, args.images, args.classes, args.imbalance, args.seed)
    points = []
    for size in args.memory_image_sizes:
        for n in args.memory_sizes:
            out = subprocess.run([sys.executable, __file__, "--memory-worker", str(folder), str(n), str(size)],
                                 capture_output=True, text=True, cwd=ROOT, timeout=1800)
            if out.returncode != 0:
                raise SystemExit(f"memory worker failed:\n{out.stderr[-3000:]}")
            points.append(json.loads(out.stdout.strip().splitlines()[-1]))
            p = points[-1]
            print(f"  {p['images']} images at {size}px: RSS +{p['rss_growth'] / 2**20:.1f} MiB, tensors "
                  f"{p['tensor_bytes'] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    fits = {}
    for size in args.memory_image_sizes:
        pts = [p for p in points if p["image_size"] == size]
        xs, ys = [p["images"] for p in pts], [p["rss_growth"] for p in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        fits[str(size)] = {"rss_bytes_per_image": round(slope, 1),
                           "rss_intercept_mib": round((my - slope * mx) / 2**20, 1),
                           "formula_bytes_per_image": per_image_bytes(size),
                           "measured_over_formula": round(slope / per_image_bytes(size), 3)}
    return {"what": "resident memory of the in-memory path (list_file, data.in_memory=always) against dataset "
                    "size, each point a fresh process; fit: RSS growth = intercept + slope x images",
            "points": points, "fit": fits}


# ----------------------------------------------------------------------------- the table


def section_table(args, fit: dict | None = None) -> dict:
    budget = (args.ram_gib - args.headroom_gib) * 2**30
    rows = []
    for b in SHIPPED:
        n = sum(b["splits"].values())
        extra = LABEL_BYTES * (2 if "GLT" in b["benchmark"] else 1)
        need = n * per_image_bytes(b["size"], extra)
        train_only = b["splits"]["train"] * per_image_bytes(b["size"], extra)
        rows.append({**b, "images": n, "gib_in_memory": round(need / 2**30, 2),
                     "gib_train_split_only": round(train_only / 2**30, 2),
                     "fits_in_memory": need <= budget,
                     "verdict": "in-memory path fits" if need <= budget else "needs file loading"})
    return {"what": f"host memory of the in-memory path (every split, 3 S^2 + labels bytes per image) against "
                    f"a {args.ram_gib} GiB machine with {args.headroom_gib} GiB left for the rest",
            "ram_gib": args.ram_gib, "headroom_gib": args.headroom_gib, "rows": rows,
            "measured_fit": fit}


def markdown(table: dict) -> str:
    lines = ["| benchmark | images (all splits) | stored side | in-memory host RAM | train split alone | "
             f"on {table['ram_gib']} GiB |", "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['benchmark']} | {r['images']:,} | {r['size']} px | {r['gib_in_memory']:.2f} GiB | "
                     f"{r['gib_train_split_only']:.2f} GiB | {r['verdict']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", choices=("loading", "memory", "table"))
    p.add_argument("--folder", default="/tmp/longtail-synthetic-100k", help="the synthetic folder (made if missing)")
    p.add_argument("--images", type=int, default=100_000, help="training images of the synthetic folder")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=10, help="timed batches per worker count and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (at least 4 x workers + 1)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32, help="data.image_size of the loading timing")
    p.add_argument("--augment", default="auto", help="data.augment of the loading timing (auto: imagenet)")
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[5000, 10000, 20000, 40000])
    p.add_argument("--memory-image-sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--ram-gib", type=float, default=24.0)
    p.add_argument("--headroom-gib", type=float, default=4.0)
    p.add_argument("--out", help="the record (default benchmarks/results/data_scale_cpu.json)")
    args = p.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on 2 cores: on purpose
    from longtail.progress import progress_bars

    with progress_bars(False):
        return run(args)


def run(args) -> int:
    if args.memory_worker:
        folder, n, size = args.memory_worker
        print(json.dumps(memory_worker(Path(folder), int(n), int(size))))
        return 0
    import torch

    from longtail.utils import atomic_write_json, git_commit

    out = Path(args.out) if args.out else HERE / "results" / "data_scale_cpu.json"
    record = json.loads(out.read_text()) if out.exists() else {}  # sections run alone update their part
    record.update({"command": " ".join(["python benchmarks/data_scale.py", *sys.argv[1:]]), "commit": git_commit(),
                   "cpu_model": cpu_model(), "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                   "torch": str(torch.__version__), "seed": args.seed,
                   "torch_threads": torch.get_num_threads(), "load_1min_start": load()})
    t0 = time.time()
    for name in args.only or ("loading", "memory", "table"):
        print(f"{name} ...", file=sys.stderr, flush=True)
        t = time.time()
        if name == "loading":
            record["loading"] = section_loading(args)
        elif name == "memory":
            record["memory"] = section_memory(args)
        else:
            record["table"] = section_table(args, record.get("memory", {}).get("fit"))
            print(markdown(record["table"]))
        record[name]["wall_seconds"] = round(time.time() - t, 1)
        record[name]["command"] = record["command"]
    record["load_1min_end"] = load()
    record["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out, record)  # an interrupted run leaves the previous record intact
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
