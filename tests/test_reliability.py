"""Nothing lost, nothing overwritten, every bad input a one-line error (issue 15): the CLI's errors, run folders
(--out refusal, --overwrite, unique default names), the lock, orphan temporary files, start-up kills, and
periodic mid-epoch checkpoints that resume exactly."""

import errno
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_image_folder
from longtail.cli import main
from longtail.config import build_config
from longtail.engine import Interrupted, train
from longtail.engine.checkpoint import load_checkpoint, save_checkpoint
from longtail.errors import UserError, WriteError
from longtail.methods.ce import CrossEntropy
from longtail.run_folder import LOCK_NAME, RunLock, folder_state, unique_run_dir

KILL = Path(__file__).parent / "helpers" / "kill_run.py"


def tiny_raw(root, epochs=3, **top):
    # As test_engine_cli.tiny_raw: 35 training images, batches of 8, so 4 steps per epoch.
    return {
        "name": "tiny", "seed": 0,
        "data": {"name": "image_folder", "root": str(root), "image_size": 16, "in_memory": "always",
                 "augment": "cifar"},
        "model": {"backbone": "tiny"},
        "stages": [{"name": "main", "method": {"name": "ce"}, "epochs": epochs, "batch_size": 8,
                    "optim": {"lr": 0.05}, "schedule": {"name": "cosine", "warmup_epochs": 1}}],
        "eval": {"batch_size": 16, "many_above": 20, "few_below": 5, "plots": False},
        **top,
    }


def final_weights(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoints" / "final.pt")["method"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _yaml(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _child(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process runs use one thread: the same arithmetic
    return subprocess.run([sys.executable, str(KILL), *args], env=env, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------- one-line errors (exit 2)


class Ctx:
    """Files the bad inputs refer to, made on demand under tmp_path."""

    def __init__(self, tmp_path: Path, image_folder: Path) -> None:
        self.tmp, self.folder = tmp_path, image_folder
        self.cfg = _yaml(tmp_path / "tiny.yaml", tiny_raw(image_folder, epochs=1))
        self.out = str(tmp_path / "out")

    def file(self, name: str, text: str = "") -> str:
        (self.tmp / name).write_text(text)
        return str(self.tmp / name)

    def one_image(self) -> str:
        root = make_image_folder(self.tmp / "one", {"train": {"ant": 1}, "test": {"ant": 1}})
        return _yaml(self.tmp / "one.yaml", tiny_raw(root, epochs=1) | {"stages": [
            {"name": "main", "method": "ce", "epochs": 1}]})  # the default batch (128)

    def checkpoint(self, kind: str) -> str:
        path = self.tmp / f"{kind}.pt"
        if kind == "wrong_model":
            save_checkpoint(path, method={"model.backbone.conv.weight": torch.zeros(4, 3, 3, 3)})
        elif kind == "truncated":
            save_checkpoint(path, method={"model.w": torch.zeros(10_000)})
            path.write_bytes(path.read_bytes()[:20_000])
        elif kind == "foreign":
            torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
        else:  # not a torch file at all
            path.write_text("hello\n")
        return str(path)

    def user_folder(self) -> list[str]:
        Path(self.out).mkdir()
        Path(self.out, "notes.txt").write_text("mine\n")
        return self.train()

    def bad_metrics(self) -> list[str]:
        Path(self.out).mkdir()
        Path(self.out, "metrics.json").write_text("{oops")
        Path(self.out, "config.yaml").write_text("name: x\n")
        return ["report", self.out]

    def cycle(self) -> list[str]:
        self.file("b.yaml", "base: a.yaml\n")
        return self.train(cfg=self.file("a.yaml", "base: b.yaml\n"))

    def train(self, *overrides: str, cfg: str | None = None) -> list[str]:
        return ["train", cfg or self.cfg, *overrides, "--out", self.out, "--quiet"]

    # ---- data files (issue 15, items 6 and 8)
    def lists(self, *extra_train: str, data: tuple[str, ...] = ()) -> list[str]:
        """A list_file dataset over the image folder, its files read by workers, with ``extra_train`` lines."""
        classes = {"ant": 24, "bee": 8, "cat": 3}
        train = [f"train/{c}/{i:04d}.png {k}" for k, (c, n) in enumerate(classes.items()) for i in range(n)]
        test = [f"test/{c}/{i:04d}.png {k}" for k, c in enumerate(classes) for i in range(4)]
        return self.train("data.name=list_file", "data.in_memory=never", "data.num_workers=2",
                          f"data.train_list={self.file('train.txt', chr(10).join(train + list(extra_train)))}",
                          f"data.test_list={self.file('test.txt', chr(10).join(test))}", *data)

    def corrupt(self, cls: str = "bee") -> None:
        for p in (self.folder / "train" / cls).iterdir():
            p.write_bytes(b"not an image")

    def corrupt_lists(self, *data: str) -> list[str]:
        self.corrupt()
        return self.lists(data=data)

    def png_bomb(self) -> list[str]:
        """A PNG whose header announces 30000 x 30000 pixels (2.7 GB decoded); its data is not even there."""
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
        (self.folder / "train" / "ant" / "0005.png").write_bytes(b"\x89PNG\r\n\x1a\n" + data)
        return self.train()

    def zip_root(self, member: bytes, *overrides: str, stored: bool = False) -> list[str]:
        path = self.tmp / "cifar.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("cifar/train/airplane/0.png", member)
        return self.train("data.name=cifar10_lt", f"data.root={path}", "data.image_size=null", *overrides)

    def glt_outside(self) -> list[str]:
        split = {"label": {"/authors/images/../../outside.png": 0}}
        ann = self.file("ann.json", json.dumps({"train": split, "test_lt": split}))
        return self.train("data.name=glt", f"data.annotation={ann}", "data.path_prefix=/authors/images/")


BAD_INPUTS = [
    ("device_string", lambda c: c.train("device=gpu"), "device 'gpu' is not a device"),
    ("device_index", lambda c: c.train("device=cuda:x"), "device 'cuda:x' is not a device"),
    ("batch_above_dataset", lambda c: c.train("stages.0.batch_size=64"), "has 0 training steps"),
    ("one_image_dataset", lambda c: c.train(cfg=c.one_image()), "has 0 training steps"),
    ("epochs_0_trainable", lambda c: c.train("stages.0.epochs=0"), "epochs=0 with method 'ce' trains nothing"),
    ("image_size_0", lambda c: c.train("data.image_size=0"), "data.image_size must be >= 1"),
    ("image_size_negative", lambda c: c.train("data.image_size=-5"), "data.image_size must be >= 1, got -5"),
    ("max_per_class_0", lambda c: c.train("data.name=digits_lt", "data.options.max_per_class=0"),
     "data.options: max_per_class must be >= 1, got 0"),
    ("num_classes_0", lambda c: c.train("data.name=list_file", "data.num_classes=0"),  # the old flat key
     "data.options: num_classes must be >= 1, got 0"),
    ("option_of_another_dataset", lambda c: c.train("data.options.max_per_class=5"),
     "data.options: dataset 'image_folder' takes no options, got max_per_class"),
    ("old_key_of_another_head", lambda c: c.train("model.head_scale=30"),
     "model.head_scale: the linear head has no such option (its options: bias; `longtail list linear`); head options "
     "are now model.head.OPTION, head_scale became model.head.scale (cosine); model.head.tau (causal_norm)"),
    ("warmup_negative", lambda c: c.train("stages.0.schedule.warmup_epochs=-2"), "warmup_epochs must be >= 0"),
    ("num_workers_negative", lambda c: c.train("data.num_workers=-1"), "data.num_workers must be >= 0"),
    ("eval_batch_0", lambda c: c.train("eval.batch_size=0"), "eval.batch_size must be >= 1"),
    ("checkpoint_every_steps_negative", lambda c: c.train("checkpoint_every_steps=-1"),
     "checkpoint_every_steps must be >= 0"),
    ("nan_loss", lambda c: c.train("stages.0.optim.lr=1e30"), "lower the learning rate (optim.lr=1e+30)"),
    ("init_from_wrong_model", lambda c: c.train(f"stages.0.init_from={c.checkpoint('wrong_model')}"),
     "do not fit this model"),
    ("init_from_truncated", lambda c: c.train(f"stages.0.init_from={c.checkpoint('truncated')}"),
     "truncated or not a longtail checkpoint (the file ends early or is damaged)"),
    ("init_from_foreign", lambda c: c.train(f"stages.0.init_from={c.checkpoint('foreign')}"),
     "is not a longtail checkpoint"),
    ("init_from_not_torch", lambda c: c.train(f"stages.0.init_from={c.checkpoint('text')}"),
     "not a PyTorch file of tensors"),
    ("pretrained_not_torch", lambda c: c.train(f"model.pretrained={c.checkpoint('text')}"),
     "not a readable weights file"),
    ("base_names_itself", lambda c: c.train(cfg=c.file("self.yaml", "base: self.yaml\nseed: 1\n")),
     "makes a cycle (self.yaml -> self.yaml)"),
    ("base_cycle", lambda c: c.cycle(), "makes a cycle (a.yaml -> b.yaml -> a.yaml)"),
    ("recipe_not_text", lambda c: c.train(cfg=c.checkpoint("foreign")), "cannot read recipe"),
    ("topk_negative", lambda c: ["predict", c.out, "x.png", "--topk", "-1"], "--topk must be at least 1"),
    ("topk_0", lambda c: ["predict", c.out, "x.png", "--topk", "0"], "--topk must be at least 1"),
    ("features_batch_0", lambda c: ["features", c.out, "--batch-size", "0"], "--batch-size must be at least 1"),
    ("glt_image_size_negative", lambda c: ["data", "glt", str(c.folder), "--out", c.out, "--image-size", "-5"],
     "--image-size must be at least 1"),
    ("resume_and_overwrite", lambda c: ["train", "--resume", "--overwrite", "--out", c.out],
     "--resume continues the run in --out, --overwrite starts a new one"),
    ("resume_nothing", lambda c: ["train", "--resume", "--out", c.out], "--resume: no run folder"),
    ("out_is_a_file", lambda c: ["train", c.cfg, "--out", c.file("afile"), "--quiet"], "is a file, not a folder"),
    ("out_user_folder", lambda c: c.user_folder(), "is not empty and is not a longtail run (it holds notes.txt)"),
    ("eval_not_a_run", lambda c: ["eval", c.out], "not a longtail run folder"),
    ("report_bad_metrics", lambda c: c.bad_metrics(), "metrics.json: not valid JSON"),
    # A run name makes one folder under runs/ (names with spaces or dots stay valid: old runs resume).
    ("run_name_escapes_runs", lambda c: c.train("name=../.."), "name '../..' names the run folder runs/"),
    ("run_name_with_backslash", lambda c: c.train("name=a\\b"), "cannot hold '/' or '\\'; pass --out"),
    # Every file of a file dataset is checked before training: existence of all, and a decode of a small one.
    ("list_file_missing_late_file", lambda c: c.lists("train/ant/9999.png 0"),
     "9999.png (1 of the 36 train images are missing)"),
    ("list_file_corrupt_file_at_load", lambda c: c.corrupt_lists(), "bee/0000.png: cannot decode image"),
    # Without that check (data.decode_check=0) a worker meets it: still one line naming the file.
    ("corrupt_file_mid_training", lambda c: c.corrupt_lists("data.decode_check=0"), ".png: cannot decode image"),
    ("decode_check_negative", lambda c: c.train("data.decode_check=-1"), "data.decode_check must be >= 0"),
    # Paths of list files and annotations stay inside data.root unless data.allow_outside_root=true.
    ("list_path_dotdot", lambda c: c.lists("../../outside.png 0"),
     "'../../outside.png' lies outside data.root"),
    ("list_path_absolute", lambda c: c.lists("/etc/hostname 0"), "'/etc/hostname' lies outside data.root"),
    ("glt_path_outside", lambda c: c.glt_outside(), "image path(s) lie outside data.root"),
    # Decompression bombs: refused from the header / the zip's directory, before anything is inflated.
    ("png_bomb", lambda c: c.png_bomb(), "30000x30000 pixels, above data.max_image_pixels=100000000"),
    ("zip_bomb", lambda c: c.zip_root(b"\0" * (8 << 20)), "above data.max_zip_ratio=200"),
    ("zip_member_too_large", lambda c: c.zip_root(os.urandom(3 << 20), "data.max_file_mb=2", stored=True),
     "3 MB, above data.max_file_mb=2"),
    ("image_file_too_large", lambda c: c.train("data.max_file_mb=0.0001"), "above data.max_file_mb=0.0001"),
    ("max_image_pixels_0", lambda c: c.train("data.max_image_pixels=0"), "data.max_image_pixels must be > 0"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(("cuda_without_gpu", lambda c: c.train("device=cuda"), "no CUDA GPU is available"))


@pytest.mark.parametrize("make_argv,expected", [pytest.param(a, e, id=i) for i, a, e in BAD_INPUTS])
def test_bad_input_is_one_line_error_with_exit_code_2(make_argv, expected, image_folder, tmp_path, capsys):
    argv = make_argv(Ctx(tmp_path, image_folder))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Everything but progress bars (the decoding bar of a file dataset, drawn with \r): the error alone.
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.search(r"\d+/\d+ \[", ln)]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied")])
def test_full_or_read_only_disk_is_one_line_error(code, words, image_folder, tmp_path, capsys, monkeypatch):
    # Root ignores file permissions and no test can fill a real disk: the OS call that fails is stood in for.
    import longtail.utils

    def refuse(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(longtail.utils.os, "replace", refuse)
    ctx = Ctx(tmp_path, image_folder)
    assert main(ctx.train()) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the decoding progress bar
    assert err.startswith("error: cannot write ") and "config.yaml" in err and words in err
    assert not list(Path(ctx.out).glob(".config.yaml.*.tmp"))  # the half-written file went with the error
    assert not (Path(ctx.out) / LOCK_NAME).exists()  # and the lock


def test_torch_reports_a_full_disk_as_a_write_error(tmp_path, monkeypatch):
    # torch's zip writer turns a failed write into its own RuntimeError; on a (nearly) full disk that is a
    # WriteError, elsewhere the RuntimeError stays what it is.
    import longtail.utils
    from longtail.utils import atomic_torch_save

    def fail(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(longtail.utils.torch, "save", fail)
    monkeypatch.setattr(longtail.utils, "_disk_nearly_full", lambda folder: True)
    with pytest.raises(WriteError, match="the disk is full"):
        atomic_torch_save({"x": 1}, tmp_path / "a.pt")
    monkeypatch.setattr(longtail.utils, "_disk_nearly_full", lambda folder: False)
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):
        atomic_torch_save({"x": 1}, tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


def test_bugs_keep_their_traceback_and_debug_shows_user_errors(monkeypatch, capsys):
    import longtail.cli

    def bug(args):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(longtail.cli, "_cmd_list", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["list"])  # not turned into "error: ..." and exit 2
    assert main(["train", "device=gpu", "--quiet"]) == 2
    with pytest.raises(UserError, match="is not a device"):
        main(["--debug", "train", "device=gpu", "--quiet"])
    with pytest.raises(UserError, match="is not a device"):
        main(["train", "device=gpu", "--quiet", "--debug"])


def test_class_names_that_are_not_utf8_are_plotted(tmp_path):
    root = make_image_folder(tmp_path / "f", {"train": {"ant": 24, "bee": 8, "cat": 3},
                                              "test": {"ant": 4, "bee": 4, "cat": 4}})
    try:
        for split in ("train", "test"):
            os.rename(os.fsencode(root / split / "cat"), os.fsencode(root / split) + b"/c\xffat")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    raw = tiny_raw(root, epochs=1)
    raw["eval"]["plots"] = True
    run = train(build_config(raw), out=tmp_path / "run", progress=False)
    assert "c\ufffdat" in json.loads((run / "metrics.json").read_text())["class_names"]
    assert (run / "plots" / "per_class_test.png").is_file() and (run / "plots" / "confusion_test.png").is_file()


# ------------------------------------------------------------------------------------ run folders, --out


def test_out_refuses_what_it_would_overwrite_unless_overwrite(image_folder, tmp_path, capsys):
    cfg = _yaml(tmp_path / "tiny.yaml", tiny_raw(image_folder, epochs=1))
    # A folder of the user's own files, a config.yaml among them: refused, untouched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "notes.txt").write_text("keep me\n")
    assert main(["train", cfg, "--out", str(mine), "--quiet"]) == 2
    assert "is not empty and is not a longtail run" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "my: own\n" and not (mine / "train.log").exists()
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt"]  # no lock left behind
    # --overwrite: the run's files are replaced, the others kept.
    assert main(["train", cfg, "--out", str(mine), "--quiet", "--overwrite"]) == 0
    assert (mine / "notes.txt").read_text() == "keep me\n"
    assert "meta" in yaml.safe_load((mine / "config.yaml").read_text())
    assert "--overwrite: removed the previous run's config.yaml" in (mine / "train.log").read_text()
    capsys.readouterr()
    # A finished run: refused (pick another --out or --overwrite), then replaced with --overwrite.
    assert folder_state(mine).kind == "finished"
    assert main(["train", cfg, "--out", str(mine), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--overwrite" in err
    first = (mine / "metrics.json").read_text()
    assert main(["train", cfg, "seed=1", "--out", str(mine), "--quiet", "--overwrite"]) == 0
    assert (mine / "metrics.json").read_text() != first
    # An existing empty folder, and what a start-up that stopped early leaves, are fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", cfg, "--out", str(empty), "--quiet"]) == 0
    left = tmp_path / "left"
    (left / "checkpoints").mkdir(parents=True)
    (left / "train.log").write_text("2026-01-01 00:00:00,000 INFO command: longtail train x --out left\n")
    assert folder_state(left).kind == "leftovers"
    assert main(["train", cfg, "--out", str(left), "--quiet"]) == 0


def test_out_refuses_an_unfinished_run_and_points_to_resume(image_folder, tmp_path, capsys, monkeypatch):
    cfg = _yaml(tmp_path / "tiny.yaml", tiny_raw(image_folder))
    _sigint_at(monkeypatch, 6)
    assert main(["train", cfg, "--out", str(tmp_path / "run"), "--quiet"]) == 130
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # the lock goes with an interrupt too
    assert folder_state(tmp_path / "run").kind == "unfinished"
    capsys.readouterr()
    assert main(["train", cfg, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert f"continue it with: longtail train --resume --out {tmp_path / 'run'}" in capsys.readouterr().err


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    a, b, c = (unique_run_dir(tmp_path / "runs", "tiny-20260101-000000") for _ in range(3))
    assert [p.name for p in (a, b, c)] == ["tiny-20260101-000000", "tiny-20260101-000000-2", "tiny-20260101-000000-3"]
    from longtail.engine.fit import new_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = build_config({"name": "same"})
    assert new_run_dir(cfg, None) != new_run_dir(cfg, None)  # same second, or not: two folders


def test_a_run_name_makes_one_folder_under_runs(tmp_path, monkeypatch):
    from longtail.engine.fit import new_run_dir

    monkeypatch.chdir(tmp_path)
    for name in ("my run v2.1", "..", ".hidden"):  # spaces and dots are names, not paths: the time is appended
        run = new_run_dir(build_config({"name": name}), None)
        assert run.resolve().parent == (tmp_path / "runs").resolve() and run.name.startswith(f"{name}-")


# --------------------------------------------------------------------------------------------------- lock


_HOLD = """import sys
from pathlib import Path
from longtail.run_folder import RunLock
lock = RunLock(Path(sys.argv[1])).acquire("holder")
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_second_process_is_refused_while_one_trains(image_folder, tmp_path, capsys):
    cfg = _yaml(tmp_path / "tiny.yaml", tiny_raw(image_folder, epochs=1))
    run = tmp_path / "run"
    assert main(["train", cfg, "--out", str(run), "--quiet"]) == 0
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        for argv in (["train", cfg, "--out", str(run), "--quiet"], ["train", "--resume", "--out", str(run)],
                     ["train", cfg, "--out", str(run), "--quiet", "--overwrite"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert f"is in use: pid {holder.pid} on " in err and "\n" not in err, err
        # The lock file does not get in the way of reading the run.
        assert main(["report", str(run)]) == 0
        assert main(["eval", str(run), "--no-write"]) == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run / LOCK_NAME).exists()  # the holder removed it when it let go
    assert (run / "metrics.json").is_file()


def test_stale_lock_of_a_killed_process_is_taken_over(image_folder, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "earlier"}) + "\n")
    train(build_config(tiny_raw(image_folder, epochs=1)), out=run, progress=False)
    assert f"took over the stale lock {run / LOCK_NAME} of pid {dead.pid}" in (run / "train.log").read_text()
    assert not (run / LOCK_NAME).exists()


def test_lock_is_released_when_training_fails(image_folder, tmp_path):
    lock = RunLock(tmp_path / "held").acquire("test")
    try:
        with pytest.raises(UserError, match="is in use"):
            RunLock(tmp_path / "held").acquire("second")  # the same process, a second lock: refused as well
    finally:
        lock.release()
    assert not (tmp_path / "held" / LOCK_NAME).exists()
    with pytest.raises(UserError, match="0 training steps"):
        train(build_config(tiny_raw(image_folder, epochs=1), ["stages.0.batch_size=64"]), out=tmp_path / "r",
              progress=False)
    assert not (tmp_path / "r" / LOCK_NAME).exists()


# ------------------------------------------------------------------- kills: start-up, mid-epoch, orphans


def _sigint_at(monkeypatch, at: int) -> None:
    """CE sends this process SIGINT inside its ``at``-th training step (once)."""
    calls, forward = [0], CrossEntropy.forward

    def forward_then_interrupt(self, images, targets, batch=None):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, images, targets, batch)

    monkeypatch.setattr(CrossEntropy, "forward", forward_then_interrupt)


def test_killed_during_startup_says_how_to_start_again(image_folder, tmp_path, capsys, monkeypatch):
    cfg = _yaml(tmp_path / "tiny.yaml", tiny_raw(image_folder, epochs=1))
    run = tmp_path / "run"
    child = _child("startup", "--", "train", cfg, "--out", str(run), "--quiet")
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not (run / "config.yaml").exists() and (run / LOCK_NAME).exists()  # killed: nothing cleaned up
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    command = f"longtail train {cfg} --out {run} --quiet"
    assert "stopped during start-up" in err and err.endswith(f"start it again with: {command}")
    assert main(shlex.split(command)[1:]) == 0  # which works: the leftovers and the stale lock are taken over
    assert (run / "metrics.json").is_file() and not (run / LOCK_NAME).exists()


def test_periodic_checkpoint_resumes_exactly_after_sigkill(image_folder, tmp_path):
    """checkpoint_every_steps=3 (epoch-end checkpoints off): the process is SIGKILLed in step 8 (epoch 2, step 4
    of 4), after the periodic checkpoint of step 7. It left its lock and, here, orphan temporary files; the
    resume removes them, starts at epoch 2 step 4 and ends bit-identical to an uninterrupted run without
    periodic checkpoints. That checkpoint is also exactly the one SIGINT writes at the same step."""
    ref = train(build_config(tiny_raw(image_folder)), out=tmp_path / "ref", progress=False)
    every = tiny_raw(image_folder, checkpoint_every_steps=3, checkpoint_every=100)
    run = tmp_path / "run"
    child = _child("step", "8", "--", "train", _yaml(tmp_path / "every.yaml", every), "--out", str(run), "--quiet")
    assert child.returncode == -signal.SIGKILL, child.stderr
    periodic = load_checkpoint(run / "checkpoints" / "last.pt")
    assert periodic["state"] == {"stage": 0, "epoch": 1, "step": 3}
    assert (run / LOCK_NAME).exists()

    # SIGINT in step 7 saves its resume point there: the same state, weights, optimiser and generator.
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupted):
        _sigint_at(mp, 7)
        train(build_config(tiny_raw(image_folder)), out=tmp_path / "sigint", progress=False)
    sigint = load_checkpoint(tmp_path / "sigint" / "checkpoints" / "last.pt")
    assert sigint["state"] == periodic["state"] and torch.equal(sigint["gen_state"], periodic["gen_state"])
    assert_same_state(sigint["method"], periodic["method"])
    assert json.dumps(sigint["optimizer"]["param_groups"]) == json.dumps(periodic["optimizer"]["param_groups"])
    for k, v in sigint["optimizer"]["state"].items():
        assert_same_state(v, periodic["optimizer"]["state"][k])

    orphans = [run / "checkpoints" / ".last.pt.k1l2ed.tmp", run / ".config.yaml.x8y9.tmp",
               run / "plots" / ".shots.a1b2.tmp.png"]
    for p in orphans:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a file")
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    log = (run / "train.log").read_text()
    assert "took over the stale lock" in log and "removed 3 temporary file(s)" in log
    assert not any(p.exists() for p in orphans) and not (run / LOCK_NAME).exists()
    assert_same_state(final_weights(ref), final_weights(run))

    # And periodic checkpoints change nothing in an uninterrupted run.
    every_step = train(build_config(tiny_raw(image_folder, checkpoint_every_steps=1)), out=tmp_path / "e1",
                       progress=False)
    assert_same_state(final_weights(ref), final_weights(every_step))
