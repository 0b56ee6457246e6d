"""Per-epoch records: metrics.csv (always), TensorBoard event files (log.tensorboard), W&B's missing-extra error."""

import csv
import importlib.util

import pytest

from longtail.config import build_config
from longtail.engine import Interrupted, train
from longtail.errors import ConfigError
from test_engine_cli import tiny_raw

HAS_TB = importlib.util.find_spec("tensorboard") is not None


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _raw(root, epochs=3, **kw):
    raw = tiny_raw(root, epochs=epochs, **kw)
    raw["data"]["val_fraction"] = 0.2
    raw["stages"][0]["eval_every"] = 2  # epochs 2 and 3 (the last) evaluated, epoch 1 not
    return raw


def test_metrics_csv_columns_and_rows(image_folder, tmp_path):
    run = train(build_config(_raw(image_folder)), out=tmp_path / "run", progress=False)
    rows = _rows(run)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("main", "1"), ("main", "2"), ("main", "3")]
    cols = list(rows[0])
    assert cols[:5] == ["stage", "epoch", "loss", "lr", "images_per_s"]
    assert {"val_top1", "val_mean_class_acc", "val_many", "val_medium", "val_few", "val_precision"} <= set(cols)
    assert rows[0]["val_top1"] == "" and rows[1]["val_top1"] != "" and rows[2]["val_mean_class_acc"] != ""
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    # cosine with one warm-up epoch: lr rises, then decays
    assert float(rows[0]["lr"]) < float(rows[1]["lr"])


def test_resume_continues_metrics_csv_without_duplicates(image_folder, tmp_path, interrupt_method):
    ref = _rows(train(build_config(_raw(image_folder)), out=tmp_path / "ref", progress=False))
    cfg = build_config(_raw(image_folder, method="interrupt_test", at_step=5))  # epoch 2 step 2 (3 steps an epoch)
    with pytest.raises(Interrupted):
        train(cfg, out=tmp_path / "int", progress=False)
    assert [r["epoch"] for r in _rows(tmp_path / "int")] == ["1"]
    # A kill between an epoch's row and its checkpoint leaves a row the resumed run trains again.
    with open(tmp_path / "int" / "metrics.csv", "a") as f:
        f.write("main,2,9.9,0.1,1.0\n")
    rows = _rows(train(out=tmp_path / "int", resume=True, progress=False))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    # Exact resume: the same lr and val metrics on every row, the same loss on the epochs trained whole (the
    # resumed epoch's loss covers its steps since the resume).
    keep = [c for c in ref[0] if c != "images_per_s"]
    for i, (r, q) in enumerate(zip(rows, ref, strict=True)):
        assert {c: r[c] for c in keep if c != "loss" or i != 1} == {c: q[c] for c in keep if c != "loss" or i != 1}
    assert rows[1]["loss"] != ""


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (pip install 'longtail[log]')")
def test_tensorboard_event_file_is_written_and_readable(image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(build_config(_raw(image_folder), ["log.tensorboard=true"]), out=tmp_path / "run", progress=False)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/images_per_s", "val/top1", "val/mean_class_acc"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("val/top1")] == [2, 3]
    rows = _rows(run)
    assert [round(e.value, 4) for e in acc.Scalars("train/loss")] == [round(float(r["loss"]), 4) for r in rows]
    assert "val/per_class_accuracy" in tags["images"] and len(acc.Images("val/per_class_accuracy")) == 2


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_its_extra_is_a_one_line_error(image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"log.wandb=proj needs the wandb package: pip install 'longtail\[wandb\]'"):
        train(build_config(_raw(image_folder), ["log.wandb=proj"]), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.csv").exists()
