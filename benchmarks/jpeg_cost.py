"""What the shared JPEG copy of CIFAR-10 costs a model trained on it: the same images, lossless and as JPEG.

    python benchmarks/jpeg_cost.py --batches DIR --out /tmp/jpeg_cost

DIR holds CIFAR-10's python batches (data_batch_1..5, test_batch): the original ones, or copies cut short (a
truncated pickle still holds every label and the first images in full; the record says how many each gave). Every
image is paired with its file in the JPEG copy (cifar10-jpeg/<split>/<class>/NNNN.jpg numbers each class's images
in batch order), the pairing checked by PSNR, and both are written as image folders under --out (orig/, jpeg/;
train/<class>/, test/<class>/). Then one recipe trains on each (row 1's CE with its head bias, balanced:
--per-class images per class, --epochs with the milestones at 60% and 80%, one thread each, side by side; one
pair per --seeds value, the pairs one after another), each run predicts the other's test images too (so do the
runs named by --also, e.g. the table's rows, trained on the whole JPEG copy), and
benchmarks/results/jpeg_cost_cpu.json records the accuracies and their paired differences (bootstrap interval,
exact McNemar test) per seed, their mean and spread over seeds, with the commands, commit and device.
A run already finished in --out is reused, not trained again.

With internet, torchvision's CIFAR10(download=True) gives the whole batches (cifar-10-batches-py/). The record was
made where none could be downloaded, with a public copy cut short at 3 MiB a batch (every label, the first 1017
images of each): data/cifar-10-batches-py/ in github.com/zhi-fangZhang/idpl_gen at commit 0626f9d.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from longtail.run_folder import RunDir
from longtail.utils import atomic_write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_BYTES = 3 * 32 * 32


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and the batch's 10,000 labels; N < 10,000 for a copy cut short."""
    raw = path.read_bytes()
    try:
        d = pickle.loads(raw, encoding="latin1")
        x = np.asarray(d["data"], np.uint8)
        labels = np.asarray(d["labels"])
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError):
        # Cut short: the labels come first (protocol 2, one BININT1 opcode each), then the images' raw bytes.
        i, j = raw.find(b"labels"), raw.find(b"U\x04data")
        labels = np.array([b[0] for b in re.findall(rb"K(.)", raw[i + len("labels"):j], re.S)])
        start = raw.find(b"T\x00\xc0\xd4\x01", j) + 5  # BINSTRING of 30,720,000 bytes
        n = min(10000, (len(raw) - start) // IMAGE_BYTES)
        x = np.frombuffer(raw[start:start + n * IMAGE_BYTES], np.uint8)
    if len(labels) != 10000:
        raise SystemExit(f"{path}: {len(labels)} labels, not a CIFAR-10 batch")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def pair(batches: Path, jpeg_zip: Path, out: Path) -> dict:
    """Write orig/ and jpeg/ image folders of every image the batches hold; the pairing's statistics."""
    z = zipfile.ZipFile(jpeg_zip)
    stats = {}
    for split, files in SPLITS.items():
        before = np.zeros(10, int)  # each class's images in the batches before this one
        values, per_batch = [], {}
        for f in files:
            x, y = read_batch(batches / f)
            per_batch[f] = len(x)
            for i in range(len(x)):
                c = int(y[i])
                k = before[c] + int((y[:i] == c).sum())
                name = f"cifar10-jpeg/{split}/{CLASSES[c]}/{k:04d}.jpg"
                try:
                    data = z.read(name)
                except KeyError:
                    raise SystemExit(f"{jpeg_zip} has no {name}: the JPEG copy's numbering differs") from None
                values.append(psnr(x[i], np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
                for kind in ("orig", "jpeg"):
                    (out / kind / split / CLASSES[c]).mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i]).save(out / "orig" / split / CLASSES[c] / f"{f}_{i:05d}.png")
                (out / "jpeg" / split / CLASSES[c] / f"{f}_{i:05d}.jpg").write_bytes(data)
            before += np.bincount(y, minlength=10)
        v = np.array(values)
        if v.min() < 18:  # a wrong pairing reads about 11 dB; JPEG quality 75 on 32 x 32 about 30
            raise SystemExit(f"{split}: an image pairs at {v.min():.1f} dB PSNR: the JPEG copy's numbering differs")
        stats[split] = {"images": len(v), "images_per_batch": per_batch,
                        "psnr_db": {"min": round(float(v.min()), 2), "p5": round(float(np.percentile(v, 5)), 2),
                                    "median": round(float(np.median(v)), 2), "mean": round(float(v.mean()), 2),
                                    "max": round(float(v.max()), 2)}}
        print(f"{split}: {len(v)} images paired, PSNR median {np.median(v):.1f} dB (min {v.min():.1f})")
    return stats


def run_name(kind: str, seed: int) -> str:
    """ce_orig / ce_jpeg for seed 0 (the first pair's folders), ce_<kind>_s<seed> for the others."""
    return f"ce_{kind}" + (f"_s{seed}" if seed else "")


def train_commands(out: Path, per_class: int, epochs: int, seed: int = 0) -> dict[str, list[str]]:
    m = [round(epochs * 0.6), round(epochs * 0.8)]
    return {kind: ["longtail", "train", "cifar10_lt/ce", f"data.root={out / kind}", "model.head_bias=true", "amp=false",
                   f"seed={seed}", "data.imbalance_ratio=1", f"data.options.max_per_class={per_class}",
                   f"epochs={epochs}", "stages.0.batch_size=128", "stages.0.optim.lr=0.1",
                   f"stages.0.schedule.milestones=[{m[0]},{m[1]}]",
                   "--out", str(out / "runs" / run_name(kind, seed)), "--quiet"]
            for kind in ("orig", "jpeg")}


def correct(csv_path: Path) -> dict[str, bool]:
    """Per test image (its batch and index, whichever format): whether the top class is its label."""
    rows = csv.DictReader(csv_path.open())
    return {r["path"].rsplit("/", 1)[1].rsplit(".", 1)[0]: r["label"] == r["class_1"] for r in rows}


def compare(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """a - b on the same images: points, a 95% bootstrap interval, the discordant pairs, exact McNemar p."""
    keys = sorted(a)
    x = np.array([a[k] for k in keys], float)
    y = np.array([b[k] for k in keys], float)
    d = x - y
    rng = np.random.default_rng(0)
    boot = [100 * d[rng.integers(0, len(d), len(d))].mean() for _ in range(5000)]
    n10, n01 = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    n = n10 + n01
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(n10, n01) + 1)) / 2**n) if n else 1.0
    return {"points": round(100 * d.mean(), 2),
            "bootstrap_95": [round(float(np.percentile(boot, q)), 2) for q in (2.5, 97.5)],
            "only_first_right": n10, "only_second_right": n01, "mcnemar_p": float(f"{p:.3g}")}


def predict_correct(run: Path, out: Path, test: str, env: dict) -> dict[str, bool]:
    """``run``'s predictions on one copy (orig / jpeg) of the paired test images, written under ``out``: per image,
    whether its top class is its label."""
    path = out / f"pred_{run.resolve().name}_on_{test}.csv"
    subprocess.run(["longtail", "predict", str(run), str(out / test / "test"), "--out", str(path),
                    "--num-workers", "0", "--quiet"], check=True, env=env, stdout=subprocess.DEVNULL)
    return correct(path)


def top1(right: dict[str, bool]) -> float:
    return round(100 * np.mean(list(right.values())), 2)


def seed_result(out: Path, seed: int, env: dict) -> dict:
    """One seed's pair: each model's top-1 on both test copies and the paired differences."""
    preds = {(model, test): predict_correct(out / "runs" / run_name(model, seed), out, test, env)
             for model in ("orig", "jpeg") for test in ("orig", "jpeg")}
    meta = yaml.safe_load(RunDir(out / "runs" / run_name("orig", seed)).config.read_text())["meta"]
    return {
        "commit": meta.get("commit"),
        "test_images": len(preds[("orig", "orig")]),
        "top1": {f"trained_{m}_tested_{t}": top1(v) for (m, t), v in preds.items()},
        "differences": {
            "lossless_vs_jpeg_each_on_its_own": compare(preds[("orig", "orig")], preds[("jpeg", "jpeg")]),
            "lossless_vs_jpeg_both_on_lossless": compare(preds[("orig", "orig")], preds[("jpeg", "orig")]),
            "lossless_vs_jpeg_both_on_jpeg": compare(preds[("orig", "jpeg")], preds[("jpeg", "jpeg")]),
        },
    }


def score_on_both(out: Path, run: Path, env: dict) -> dict:
    """A run trained elsewhere (e.g. a table row, on the JPEG copy) on both copies of the paired test images: what
    the JPEG test images alone cost it."""
    orig, jpeg = (predict_correct(run, out, test, env) for test in ("orig", "jpeg"))
    return {"top1_on_lossless": top1(orig), "top1_on_jpeg": top1(jpeg), "lossless_minus_jpeg": compare(orig, jpeg)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=Path, required=True, help="folder with data_batch_1..5 and test_batch")
    p.add_argument("--jpeg", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg.zip")
    p.add_argument("--out", type=Path, required=True, help="work folder: image folders, runs, predictions")
    p.add_argument("--per-class", type=int, default=475, help="training images per class (balanced)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds: one lossless / JPEG pair each (runs already in --out are reused)")
    p.add_argument("--also", type=Path, nargs="*", default=[], metavar="RUN",
                   help="finished runs trained elsewhere (e.g. benchmarks/runs/tde) to score on both test copies")
    p.add_argument("--record", type=Path, default=HERE / "results" / "jpeg_cost_cpu.json")
    a = p.parse_args(argv)
    out = a.out.resolve()
    if (out / "pairing.json").is_file():  # the image folders were written by an earlier call
        stats = json.loads((out / "pairing.json").read_text())
    else:
        stats = pair(a.batches, a.jpeg, out)
        atomic_write_json(out / "pairing.json", stats)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    per_seed, cmds = {}, {}
    for seed in a.seeds:  # each seed's pair side by side, one thread each; the seeds one after another
        cmds[seed] = train_commands(out, a.per_class, a.epochs, seed)
        procs = [subprocess.Popen(cmd, env=env) for kind, cmd in cmds[seed].items()
                 if not RunDir(out / "runs" / run_name(kind, seed)).metrics.is_file()]
        if any(pr.wait() for pr in procs):
            raise SystemExit("a training run failed: see its train.log under --out/runs")
        per_seed[seed] = seed_result(out, seed, env)
    meta = yaml.safe_load(RunDir(out / "runs" / run_name("orig", a.seeds[0])).config.read_text())["meta"]
    names = list(per_seed[a.seeds[0]]["differences"])
    record = {
        "question": "what the shared JPEG copy (quality ~75, chroma-subsampled) costs a model trained on it",
        "command": " ".join(["python", "benchmarks/jpeg_cost.py", *(argv if argv is not None else sys.argv[1:])]),
        **{k: meta.get(k) for k in ("commit", "device", "torch", "longtail")},
        "seeds": a.seeds,
        "pairing": stats,
        "train_commands": {k: " ".join(v) for k, v in cmds[a.seeds[0]].items()},
        "test_images": per_seed[a.seeds[0]]["test_images"],
        "per_seed": {str(s): r for s, r in per_seed.items()},
        # The training seed's share of the noise, beside each seed's bootstrap over test images.
        "mean_over_seeds": {k: round(float(np.mean([r["differences"][k]["points"] for r in per_seed.values()])), 2)
                            for k in names},
        "spread_over_seeds": {k: [min(r["differences"][k]["points"] for r in per_seed.values()),
                                  max(r["differences"][k]["points"] for r in per_seed.values())] for k in names},
        "trained_elsewhere": {str(r): score_on_both(out, r, env) for r in a.also},  # as given, like the command
    }
    atomic_write_json(a.record, record)
    print(json.dumps({"per_seed": record["per_seed"], "mean_over_seeds": record["mean_over_seeds"]}, indent=1))
    print(f"written {a.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
