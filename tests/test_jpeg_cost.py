"""benchmarks/jpeg_cost.py's data side on synthetic batches: full and cut-short python batches read back, every
image paired with its file in a JPEG copy numbered per class in batch order, and a wrong numbering refused."""

import importlib.util
import io
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("jpeg_cost", REPO / "benchmarks" / "jpeg_cost.py")
jc = importlib.util.module_from_spec(_spec)
sys.modules["jpeg_cost"] = jc
_spec.loader.exec_module(jc)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """(n, 3072) uint8 rows in CIFAR's layout (R, G, B planes): smooth gradients, which JPEG keeps well."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    planes = [(255 * (a * xx + (1 - a) * yy)).astype(np.uint8) for a in g.random(3 * n)]
    return np.stack(planes).reshape(n, 3 * 1024)


def python2_batch(labels: np.ndarray, data: np.ndarray) -> bytes:
    """A batch laid out as the original cPickle protocol-2 file: the labels as BININT1 opcodes in 1000-item APPENDS
    chunks, then the images' 30,720,000 raw bytes as one BINSTRING."""
    out = bytearray(b"\x80\x02}q\x01(U\x0bbatch_labelq\x02U\x15training batch 1 of 5q\x03U\x06labelsq\x04]q\x05")
    for i in range(0, len(labels), 1000):
        out += b"(" + b"".join(b"K" + bytes([int(v)]) for v in labels[i:i + 1000]) + b"e"
    out += (b"U\x04dataq\x06cnumpy.core.multiarray\n_reconstruct\nq\x07cnumpy\nndarray\nq\x08K\x00\x85U\x01b\x87Rq"
            b"\t(K\x01M\x10'M\x00\x0c\x86cnumpy\ndtype\nq\nU\x02u1K\x00K\x01\x87Rq\x0b(K\x03U\x01|NNNJ\xff\xff\xff"
            b"\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\xc0\xd4\x01")
    return bytes(out + data.tobytes())


def test_a_cut_short_batch_gives_every_label_and_its_whole_images(tmp_path):
    g = np.random.default_rng(0)
    labels, data = g.integers(0, 10, 10000), g.integers(0, 256, (10000, 3072), dtype=np.uint8)
    raw = python2_batch(labels, data)
    cut = len(raw) - 10000 * 3072 + 37 * 3072 + 100  # 37 images and part of the 38th
    (tmp_path / "short").write_bytes(raw[:cut])
    x, y = jc.read_batch(tmp_path / "short")
    assert (y == labels).all() and x.shape == (37, 32, 32, 3)
    assert (x == data[:37].reshape(37, 3, 32, 32).transpose(0, 2, 3, 1)).all()
    # A whole batch, as Python 3 writes one: read by pickle itself.
    (tmp_path / "full").write_bytes(pickle.dumps({"labels": labels.tolist(), "data": data[:50]}))
    x, y = jc.read_batch(tmp_path / "full")
    assert x.shape == (50, 32, 32, 3) and (y == labels).all()
    (tmp_path / "bad").write_bytes(pickle.dumps({"labels": [1, 2], "data": data[:2]}))
    with pytest.raises(SystemExit, match="2 labels, not a CIFAR-10 batch"):
        jc.read_batch(tmp_path / "bad")


def make_copy(tmp_path: Path, wrong: bool = False) -> tuple[Path, Path]:
    """Cut-short batches (the first 8 images each) and a JPEG copy of those images, numbered per class in batch
    order over the whole batches; ``wrong``: each class's images under each other's numbers."""
    batches = tmp_path / "batches"
    batches.mkdir()
    files = {}  # zip name -> image
    for split, names in jc.SPLITS.items():
        seen = np.zeros(10, int)
        for b, f in enumerate(names):
            labels = np.random.default_rng(b).integers(0, 10, 10000)
            full = np.zeros((10000, 3072), np.uint8)
            full[:8] = smooth_images(8, seed=b)
            raw = python2_batch(labels, full)
            (batches / f).write_bytes(raw[: len(raw) - (10000 - 8) * 3072])
            for i in range(8):
                c = labels[i]
                k = seen[c] + int((labels[:i] == c).sum())
                img = full[i].reshape(3, 32, 32).transpose(1, 2, 0)
                files[f"cifar10-jpeg/{split}/{jc.CLASSES[c]}/{k:04d}.jpg"] = img
            seen += np.bincount(labels, minlength=10)
    names = sorted(files)
    if wrong:  # within each folder, the images move one number on
        by_dir = {}
        for n in names:
            by_dir.setdefault(n.rsplit("/", 1)[0], []).append(n)
        files = {n: files[group[(group.index(n) + 1) % len(group)]] for group in by_dir.values() for n in group}
    zpath = tmp_path / "copy.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for n in names:
            buf = io.BytesIO()
            Image.fromarray(files[n]).save(buf, "JPEG", quality=75)
            z.writestr(n, buf.getvalue())
    return batches, zpath


def test_every_image_pairs_with_its_jpeg_file_and_a_wrong_numbering_is_refused(tmp_path):
    batches, zpath = make_copy(tmp_path)
    stats = jc.pair(batches, zpath, tmp_path / "out")
    assert stats["train"]["images"] == 40 and stats["test"]["images"] == 8
    assert stats["train"]["images_per_batch"] == {f"data_batch_{i}": 8 for i in range(1, 6)}
    assert stats["test"]["psnr_db"]["min"] > 25
    pngs = sorted((tmp_path / "out" / "orig" / "train").rglob("*.png"))
    jpgs = sorted((tmp_path / "out" / "jpeg" / "train").rglob("*.jpg"))
    assert [p.stem for p in pngs] == [p.stem for p in jpgs] and len(pngs) == 40
    x, y = jc.read_batch(batches / "data_batch_2")
    first = tmp_path / "out" / "orig" / "train" / jc.CLASSES[y[0]] / "data_batch_2_00000.png"
    assert (np.asarray(Image.open(first)) == x[0]).all()  # lossless, in its label's folder
    other = tmp_path / "other"
    other.mkdir()
    batches, zpath = make_copy(other, wrong=True)
    with pytest.raises(SystemExit, match="numbering differs"):
        jc.pair(batches, zpath, other / "out")


def test_each_seed_trains_its_own_pair_in_its_own_folders(tmp_path):
    first, other = jc.train_commands(tmp_path, 475, 50), jc.train_commands(tmp_path, 475, 50, seed=2)
    assert set(first) == set(other) == {"orig", "jpeg"}
    for kind in ("orig", "jpeg"):
        # Seed 0 keeps the first pair's folders (reused by a later call), other seeds get their own.
        assert first[kind][first[kind].index("--out") + 1] == str(tmp_path / "runs" / f"ce_{kind}")
        assert other[kind][other[kind].index("--out") + 1] == str(tmp_path / "runs" / f"ce_{kind}_s2")
        assert "seed=0" in first[kind] and "seed=2" in other[kind] and f"data.root={tmp_path / kind}" in other[kind]
        assert "stages.0.schedule.milestones=[30,40]" in other[kind]
