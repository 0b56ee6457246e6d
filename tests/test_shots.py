"""eval.shots=auto (shot groups at the terciles of the class counts) and the warning for groups of < 2 classes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import make_image_folder
from longtail.config import ConfigError, build_config
from longtail.engine import train
from longtail.evaluation.metrics import ShotThresholds

CIFAR10_LT_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_auto_thresholds_split_cifar10_lt_into_thirds():
    t = ShotThresholds.from_counts(torch.tensor(CIFAR10_LT_R100))
    assert (t.many_above, t.few_below) == (1077, 232)  # 1/3 and 2/3 quantiles of the ten counts
    sizes = {k: int(m.sum()) for k, m in t.groups(torch.tensor(CIFAR10_LT_R100)).items()}
    assert sizes == {"many": 3, "medium": 4, "few": 3}
    assert t.small_groups(torch.tensor(CIFAR10_LT_R100)) == {}


def test_fixed_thresholds_on_small_data_name_their_tiny_groups():
    t = ShotThresholds()  # > 100 / < 20
    assert t.small_groups(torch.tensor([24, 8, 3])) == {"many": 0, "medium": 1}


def _raw(root, **eval_opts):
    return {
        "name": "shots", "seed": 0,
        "data": {"name": "image_folder", "root": str(root), "image_size": 16, "in_memory": "always"},
        "model": {"backbone": "tiny"},
        "stages": [{"name": "main", "method": {"name": "ce"}, "epochs": 1, "batch_size": 8}],
        "eval": {"plots": False, **eval_opts},
    }


def test_a_run_warns_about_one_class_groups_and_auto_fixes_it(image_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="longtail"):
        run = train(build_config(_raw(image_folder)), out=tmp_path / "fixed", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["small_shot_groups"] == {"many": 0, "medium": 1}  # counts 24 / 8 / 3 under > 100 / < 20
    assert "set eval.shots=auto" in caplog.text and "many: 0, medium: 1" in caplog.text
    assert m["splits"]["test"]["many"] is None
    six = make_image_folder(tmp_path / "six", {
        "train": {"a": 40, "b": 30, "c": 20, "d": 10, "e": 5, "f": 3},
        "test": dict.fromkeys("abcdef", 2),
    })
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longtail"):
        run = train(build_config(_raw(six, shots="auto")), out=tmp_path / "auto", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert "small_shot_groups" not in m and "shot groups" not in caplog.text
    assert m["thresholds"] == "many > 23, few < 9 training images"  # terciles of 40 30 20 10 5 3
    test = m["splits"]["test"]
    assert test["group_sizes"] == {"many": 2, "medium": 2, "few": 2}
    pc = test["per_class"]
    assert test["many"] == pytest.approx((pc[0] + pc[1]) / 2) and test["few"] == pytest.approx((pc[4] + pc[5]) / 2)


def test_auto_on_three_classes_says_why_rather_than_suggesting_itself(image_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="longtail"):
        train(build_config(_raw(image_folder, shots="auto")), out=tmp_path / "run", progress=False)
    assert "too few classes for three groups" in caplog.text and "set eval.shots=auto" not in caplog.text


def test_unknown_shots_mode_is_refused():
    with pytest.raises(ConfigError, match="eval.shots must be fixed or auto, got 'tercile'"):
        build_config(_raw("/nowhere", shots="tercile"))
