"""User data: image folders, list files, CIFAR image-folder copies, and the errors bad input gets."""

import gzip
import zipfile

import pytest
import torch

from conftest import SHARED_DATA, make_image_folder
from longtail.config import DataConfig
from longtail.data import DataError, class_counts, create_dataset
from longtail.data.folder import read_list_file


def test_image_folder_loads(image_folder):
    ds = create_dataset(DataConfig(name="image_folder", root=str(image_folder), image_size=16))
    assert ds.class_names == ["ant", "bee", "cat"]
    assert ds.train_counts().tolist() == [24, 8, 3]
    assert len(ds.splits["test"]) == 12 and ds.eval_splits == ["test"]
    assert not ds.train.in_memory


def test_image_folder_in_memory(image_folder):
    ds = create_dataset(DataConfig(name="image_folder", root=str(image_folder), image_size=16, in_memory="always"))
    assert ds.train.images.shape == (35, 3, 16, 16) and ds.train.images.dtype == torch.uint8


def test_val_fraction_holds_out_from_train(image_folder):
    ds = create_dataset(DataConfig(name="image_folder", root=str(image_folder), val_fraction=0.25))
    assert len(ds.train) + len(ds.splits["val"]) == 35
    assert set(ds.train.paths).isdisjoint(ds.splits["val"].paths)
    assert set(ds.splits["val"].paths).isdisjoint(ds.splits["test"].paths)


def test_missing_root_is_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        create_dataset(DataConfig(name="image_folder", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="needs data.root"):
        create_dataset(DataConfig(name="image_folder"))


def test_empty_class_is_clear(image_folder):
    (image_folder / "train" / "dog").mkdir()
    with pytest.raises(DataError, match="dog: empty class"):
        create_dataset(DataConfig(name="image_folder", root=str(image_folder)))


def test_corrupt_image_names_the_file(image_folder):
    bad = image_folder / "train" / "bee" / "0003.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="0003.png: cannot decode"):
        create_dataset(DataConfig(name="image_folder", root=str(image_folder), in_memory="always"))


def test_test_class_without_train_folder(image_folder):
    make_image_folder(image_folder, {"test": {"zebra": 1}})
    with pytest.raises(DataError, match="zebra"):
        create_dataset(DataConfig(name="image_folder", root=str(image_folder)))


def _write_lists(root, lines_train, lines_test, gz=False):
    def write(name, lines):
        p = root / name
        if gz:
            with gzip.open(p, "wt") as f:
                f.write("\n".join(lines) + "\n")
        else:
            p.write_text("\n".join(lines) + "\n")
        return p

    ext = ".txt.gz" if gz else ".txt"
    return write("train" + ext, lines_train), write("test" + ext, lines_test)


@pytest.mark.parametrize("gz", [False, True])
def test_list_files(image_folder, gz):
    train = [f"train/ant/{i:04d}.png 0" for i in range(5)] + ["train/bee/0000.png 1", "train/cat/0000.png 2"]
    test = ["test/ant/0000.png 0", "test/bee/0000.png 1", "test/cat/0000.png 2"]
    tr, te = _write_lists(image_folder, train, test, gz)
    ds = create_dataset(DataConfig(name="list_file", root=str(image_folder),
                                   options={"train_list": str(tr), "test_list": str(te)}))
    assert ds.num_classes == 3 and ds.train_counts().tolist() == [5, 1, 1]


def test_list_file_label_out_of_range(image_folder):
    tr, te = _write_lists(image_folder, ["train/ant/0000.png 0", "train/bee/0000.png 1"], ["test/ant/0000.png 5"])
    with pytest.raises(DataError, match="label 5"):
        create_dataset(DataConfig(name="list_file", root=str(image_folder),
                                  options={"train_list": str(tr), "test_list": str(te), "num_classes": 2}))


def test_list_file_missing_image(image_folder):
    tr, te = _write_lists(image_folder, ["train/ant/9999.png 0"], ["test/ant/0000.png 0"])
    with pytest.raises(DataError, match="image not found: .*9999.png"):
        create_dataset(DataConfig(name="list_file", root=str(image_folder),
                                  options={"train_list": str(tr), "test_list": str(te)}))


def test_list_file_bad_line(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("a.jpg 0\nb.jpg x\n")
    with pytest.raises(DataError, match=r"l.txt:2: label 'x' is not an integer"):
        read_list_file(p, tmp_path)


def test_empty_class_in_list_file(image_folder):
    tr, te = _write_lists(image_folder, ["train/ant/0000.png 0", "train/cat/0000.png 2"], ["test/ant/0000.png 0"])
    with pytest.raises(DataError, match="no training image"):
        create_dataset(DataConfig(name="list_file", root=str(image_folder),
                                  options={"train_list": str(tr), "test_list": str(te)}))


def test_imagenet_lt_checks_split_sizes(image_folder):
    tr, te = _write_lists(image_folder, ["train/ant/0000.png 0"], ["test/ant/0000.png 0"])
    with pytest.raises(DataError, match="imagenet_lt train has 115846"):
        create_dataset(DataConfig(name="imagenet_lt", root=str(image_folder), options={"train_list": str(tr)}))


@pytest.mark.skipif(not (SHARED_DATA / "splits" / "Places_LT_train.txt.gz").exists(), reason="shared splits absent")
def test_shared_places_lt_list_parses(tmp_path):
    paths, labels = read_list_file(SHARED_DATA / "splits" / "Places_LT_train.txt.gz", tmp_path)
    assert len(paths) == 62500 and max(labels) == 364
    counts = torch.bincount(torch.tensor(labels))
    # spec baselines.md 8.3: Places-LT has 131 / 163 / 71 classes with > 100 / 20-100 / < 20 images.
    assert ((counts > 100).sum(), ((counts >= 20) & (counts <= 100)).sum(), (counts < 20).sum()) == (131, 163, 71)


def _cifar_like_zip(tmp_path, num_classes=10, per_class=30):
    folder = make_image_folder(tmp_path / "cifar", {
        "train": {f"c{i}": per_class for i in range(num_classes)},
        "test": {f"c{i}": 2 for i in range(num_classes)}}, size=32)
    zpath = tmp_path / "cifar.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in folder.rglob("*.png"):
            z.write(p, "cifar-copy/" + str(p.relative_to(folder)))
    return zpath


def test_cifar_lt_from_an_image_folder_zip(tmp_path):
    zpath = _cifar_like_zip(tmp_path)
    cfg = DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=10)
    ds = create_dataset(cfg)
    assert ds.train_counts().tolist() == class_counts(10, 30, 10)
    assert len(ds.splits["test"]) == 20 and ds.train.images.shape[1:] == (3, 32, 32)
    again = create_dataset(cfg)  # from the decoded cache now
    assert torch.equal(again.train.images, ds.train.images)
    other = create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=10, subset_seed=1))
    assert not torch.equal(other.train.images, ds.train.images)


def _image_keys(images):
    return {bytes(img.numpy().tobytes()) for img in images}


def test_cifar_val_per_class_from_the_images_the_subset_left_out(tmp_path, caplog):
    zpath = _cifar_like_zip(tmp_path)  # 30 train images per class, 2 test
    base = create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=10))
    with caplog.at_level("WARNING", logger="longtail"):
        ds = create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=10, val_per_class=5))
    # train is exactly the one without the option (same images, same subset hash); test untouched
    assert torch.equal(ds.train.images, base.train.images) and torch.equal(ds.train.targets, base.train.targets)
    assert ds.info["subset_hash"] == base.info["subset_hash"]
    assert ds.info["train_counts_hash"] == base.info["train_counts_hash"]
    assert torch.equal(ds.splits["test"].images, base.splits["test"].images)
    # the head class keeps all 30 of its images: its val holds none, a warning says so, info records the counts
    assert ds.info["val_counts"] == [0] + [5] * 9 == ds.splits["val"].class_counts(10).tolist()
    assert "fewer unused training images" in caplog.text and "c0 0" in caplog.text
    # disjoint from train and test, drawn from the CIFAR training images
    full = create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=1))  # all 300 kept
    val = _image_keys(ds.splits["val"].images)
    assert len(val) == 45 and val <= _image_keys(full.train.images)
    assert not val & _image_keys(ds.train.images) and not val & _image_keys(ds.splits["test"].images)
    # deterministic for a seed; another subset seed draws another val
    again = create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=10, val_per_class=5))
    assert torch.equal(again.splits["val"].images, ds.splits["val"].images)
    other = create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=10, val_per_class=5,
                                      subset_seed=1))
    assert not torch.equal(other.splits["val"].images, ds.splits["val"].images)


def test_cifar_val_per_class_is_balanced_where_every_class_has_leftovers(tmp_path, caplog):
    zpath = _cifar_like_zip(tmp_path)
    with caplog.at_level("WARNING", logger="longtail"):
        ds = create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=10, val_per_class=5,
                                       options={"max_per_class": 20}))
    assert ds.splits["val"].class_counts(10).tolist() == [5] * 10 and "fewer" not in caplog.text


def test_cifar_val_per_class_errors(tmp_path, image_folder):
    from longtail.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="data.val_per_class must be >= 0"):
        build_config({"data": {"name": "cifar10_lt", "val_per_class": -1}})
    with pytest.raises(ConfigError, match="both make a val split"):
        build_config({"data": {"name": "cifar10_lt", "val_per_class": 5, "val_fraction": 0.1}})
    with pytest.raises(DataError, match="applies to cifar10_lt and cifar100_lt"):
        create_dataset(DataConfig(name="image_folder", root=str(image_folder), val_per_class=2))
    zpath = _cifar_like_zip(tmp_path)
    with pytest.raises(DataError, match="no image is left for val"):
        create_dataset(DataConfig(name="cifar10_lt", root=str(zpath), imbalance_ratio=1, val_per_class=2))


def test_cifar_wrong_class_count(tmp_path):
    zpath = _cifar_like_zip(tmp_path, num_classes=3, per_class=2)
    with pytest.raises(DataError, match="expected 10 class folders"):
        create_dataset(DataConfig(name="cifar10_lt", root=str(zpath)))


def test_cifar_missing_files_suggest_download(tmp_path):
    with pytest.raises(DataError, match="download"):
        create_dataset(DataConfig(name="cifar10_lt", root=str(tmp_path / "empty")))


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.zip").exists(), reason="shared CIFAR-10 JPEG copy absent")
def test_shared_cifar10_lt_r100_exact_counts():
    ds = create_dataset(DataConfig(name="cifar10_lt", root=str(SHARED_DATA / "cifar10-jpeg.zip")))
    assert ds.train_counts().tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(ds.train) == 12406 and len(ds.splits["test"]) == 10000
    assert ds.splits["test"].class_counts(10).tolist() == [1000] * 10
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"]


def test_cifar_download_from_a_loopback_server(tmp_path, monkeypatch):
    """data.options.download=true fetches and checks the archive (here a tiny one served on 127.0.0.1)."""
    import hashlib
    import http.server
    import pickle
    import tarfile
    import threading
    from functools import partial

    from torchvision.datasets import CIFAR10

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)

    def batch(name, labels):
        data = torch.randint(0, 256, (len(labels), 3 * 32 * 32), generator=g, dtype=torch.uint8).numpy()
        (src / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
        return [name, hashlib.md5((src / name).read_bytes()).hexdigest()]

    train = batch("data_batch_1", [c for c in range(10) for _ in range(12)])
    test = batch("test_batch", list(range(10)) * 2)
    (src / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    serve = tmp_path / "serve"
    serve.mkdir()
    with tarfile.open(serve / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz")
        archive_md5 = hashlib.md5((serve / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
        monkeypatch.setattr(CIFAR10, "tgz_md5", archive_md5)
        monkeypatch.setattr(CIFAR10, "train_list", [train])
        monkeypatch.setattr(CIFAR10, "test_list", [test])
        monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": hashlib.md5((src / "batches.meta").read_bytes()).hexdigest()})
        root = tmp_path / "downloaded"
        with pytest.raises(DataError, match="data.options.download=true"):
            create_dataset(DataConfig(name="cifar10_lt", root=str(root), imbalance_ratio=4))
        ds = create_dataset(DataConfig(name="cifar10_lt", root=str(root), imbalance_ratio=4,
                                       options={"download": True}))
    finally:
        server.shutdown()
        server.server_close()  # the port refuses connections from here on
    assert ds.train_counts().tolist() == class_counts(10, 12, 4)
    assert len(ds.splits["test"]) == 20 and ds.class_names[0] == "c0"
    assert (root / "cifar-10-batches-py" / "data_batch_1").is_file()
    # The server is gone: a download that cannot connect is a one-line error that says what to do.
    with pytest.raises(DataError, match=r"could not download CIFAR-10 into .*: .*Check the network, or put "
                                        r"cifar-10-python.tar.gz \(from http://127.0.0.1:\d+/"):
        create_dataset(DataConfig(name="cifar10_lt", root=str(tmp_path / "again"), options={"download": True}))


def test_cifar_download_from_a_silent_server_times_out(tmp_path, monkeypatch):
    """A server that takes the connection and never answers (a blackholed network) fails in one line instead of
    waiting for ever; the process's default socket timeout is left as it was."""
    import socket

    from torchvision.datasets import CIFAR10

    import longtail.data.cifar as cifar

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # the kernel completes the handshake; nothing ever reads or answers
    try:
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{silent.getsockname()[1]}/cifar-10-python.tar.gz")
        monkeypatch.setattr(cifar, "DOWNLOAD_TIMEOUT_S", 0.5)
        with pytest.raises(DataError, match=r"could not download CIFAR-10 into .*: no answer for 0.5 s\. Check the "
                                            r"network"):
            create_dataset(DataConfig(name="cifar10_lt", root=str(tmp_path / "d"), options={"download": True}))
    finally:
        silent.close()
    assert socket.getdefaulttimeout() is None


# ------------------------------------------------------------------ issue 15: every file checked, bombs, roots


def test_image_sizes_come_from_the_header_of_every_decodable_format():
    import io

    from PIL import Image
    from torchvision.io import encode_jpeg, encode_png

    from longtail.data.images import image_size_from_header

    x = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    assert image_size_from_header(bytes(encode_png(x).numpy())) == (53, 37)  # (width, height)
    assert image_size_from_header(bytes(encode_jpeg(x).numpy())) == (53, 37)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    for fmt, opts in [("GIF", {}), ("WEBP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"exif": b"Exif\0\0x"}),
                      ("JPEG", {"progressive": True})]:
        buf = io.BytesIO()
        pil.save(buf, fmt, **opts)
        assert image_size_from_header(buf.getvalue()) == (53, 37), (fmt, opts)
    assert image_size_from_header(b"BM" + b"\0" * 60) is None  # a format without a parser: the decoder decides
    assert image_size_from_header(bytes(encode_png(x).numpy())[:20]) is None  # cut short


def test_pixel_limit_is_a_setting(image_folder):
    big = image_folder / "train" / "ant" / "0000.png"
    with pytest.raises(DataError, match=r"0000.png: 16x16 pixels, above data.max_image_pixels=255"):
        create_dataset(DataConfig(name="image_folder", root=str(image_folder), max_image_pixels=255))
    assert big.is_file()
    assert len(create_dataset(DataConfig(name="image_folder", root=str(image_folder), max_image_pixels=256)).train)


def test_every_file_is_checked_and_small_datasets_decoded_before_training(image_folder):
    cfg = DataConfig(name="image_folder", root=str(image_folder), in_memory="never", image_size=16)
    bad = image_folder / "train" / "cat" / "0002.png"  # the last training file, far from the first one checked
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cat/0002.png: cannot decode image"):
        create_dataset(cfg)
    cfg.decode_check = 46  # 47 images in all: above the limit, only existence is checked
    ds = create_dataset(cfg)
    assert ds.train.paths[-1] == str(bad)
    bad.unlink()
    bad.symlink_to(image_folder / "gone.png")  # listed in the folder, not there: a link to a deleted file
    with pytest.raises(DataError, match=r"image not found: .*cat/0002.png \(1 of the 35 train images"):
        create_dataset(cfg)


def test_a_bad_file_met_by_a_worker_is_one_line_naming_it(image_folder):
    from longtail.data.loaders import DataErrorInWorker, Loader

    cfg = DataConfig(name="image_folder", root=str(image_folder), in_memory="never", image_size=16, decode_check=0)
    ds = create_dataset(cfg)
    (image_folder / "train" / "bee" / "0003.png").unlink()
    loader = Loader(ds, torch.device("cpu"), augment="none", num_workers=2)
    with pytest.raises(DataErrorInWorker) as e:
        for _ in loader.train_batches(torch.arange(len(ds.train)), 8, False, torch.Generator().manual_seed(0)):
            pass
    loader.close()
    assert str(e.value) == f"image not found: {image_folder / 'train' / 'bee' / '0003.png'}"
    # DataLoader re-raises a worker's error as type(e)(its traceback): the last line is kept.
    assert str(DataErrorInWorker("Caught X in worker 0.\nTraceback:\n  ...\nm.DataErrorInWorker: a: b")) == "a: b"


def test_list_and_annotation_paths_stay_in_root_unless_allowed(image_folder, tmp_path):
    from longtail.data.glt import read_glt_annotations

    outside = tmp_path / "outside.png"
    outside.write_bytes((image_folder / "train" / "ant" / "0000.png").read_bytes())
    lst = tmp_path / "train.txt"
    lst.write_text(f"train/ant/0001.png 0\n../outside.png 1\n{outside} 1\n")
    with pytest.raises(DataError, match=r"train.txt:2: '../outside.png' lies outside data.root"):
        read_list_file(lst, image_folder)
    paths, _ = read_list_file(lst, image_folder, allow_outside_root=True)
    assert [str(outside) == str(p) or p.endswith("../outside.png") for p in paths[1:]] == [True, True]
    ann = tmp_path / "ann.json"
    split = {"label": {str(outside): 0}}
    ann.write_text(__import__("json").dumps({"train": split, "test_lt": split}))
    with pytest.raises(DataError, match=r"1 image path\(s\) lie outside data.root"):
        read_glt_annotations(ann, image_folder)
    assert read_glt_annotations(ann, image_folder, allow_outside_root=True)["splits"]["train"].paths == [str(outside)]


def test_zip_limits_are_read_from_its_directory(tmp_path):
    from longtail.data.cifar import _folder_members
    from longtail.data.images import ImageLimits

    zpath = _cifar_like_zip(tmp_path)
    members, read = _folder_members(zpath, ImageLimits())
    assert len(members) == 320 and read(members[0][2])[:4] == b"\x89PNG"
    with pytest.raises(DataError, match=r"above data.max_file_mb=0.0001"):
        _folder_members(zpath, ImageLimits(max_file_mb=0.0001))
    # A member whose directory understates its size: read no further than it says, and say it is damaged.
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(lying, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("c/train/airplane/0.png", b"\0" * (4 << 20))
    data = bytearray(lying.read_bytes())
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # local header and central directory: file_size := 1000
        at = data.find(header)
        at_size = at + (22 if header == b"PK\x03\x04" else 24)
        data[at_size:at_size + 4] = (1000).to_bytes(4, "little")
    lying.write_bytes(bytes(data))
    members, read = _folder_members(lying, ImageLimits())
    with pytest.raises(DataError, match="damaged zip member"):
        read(members[0][2])
