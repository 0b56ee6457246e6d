"""Plots and markdown reports built from fake run folders (config.yaml + metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from longtail.evaluation.plots import (
    parse_thresholds,
    plot_confusion,
    plot_per_attribute,
    plot_per_class,
    plot_shot_bars,
    plot_sweep,
    save_run_plots,
)
from longtail.evaluation.report import load_run, results_table, runs_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
THRESHOLDS = "many > 100, few < 20 training images"


def _split(top1, many, medium, few, num_classes=4, confusion=True, per_attribute=False,
           thresholds=THRESHOLDS) -> dict:
    m = {
        "top1": top1, "mean_class_acc": top1, "precision": 55.5, "many": many, "medium": medium, "few": few,
        "per_class": [90.0, 60.0, None, 10.0][:num_classes] + [50.0] * max(0, num_classes - 4),
        "group_sizes": {"many": 1, "medium": 1, "few": 2}, "thresholds": thresholds, "num_samples": 40,
    }
    if confusion:
        m["confusion"] = [[10 if i == j else 1 for j in range(num_classes)] for i in range(num_classes)]
    if per_attribute:
        m["per_attribute"] = {"0": 80.0, "1": 42.25, "2": None}
    return m


def _metrics(splits: dict, thresholds=THRESHOLDS) -> dict:
    return {"splits": splits, "train_counts": [500, 50, 10, 5], "class_names": ["ant", "bee", "cat", "dog"],
            "epoch": 200, "stage": "main", "thresholds": thresholds, "unknown_key": 1}


def _config(name: str, stages: list[dict]) -> dict:
    return {"name": name, "seed": 0, "data": {"name": "cifar10_lt", "imbalance_ratio": 100.0},
            "model": {"backbone": "resnet32"}, "stages": stages,
            "meta": {"version": "0.1", "commit": None, "torch": "2.x", "device": "cpu",
                     "started": "t0", "finished": "t1"}}


def make_run(root: Path, name: str, metrics: dict, stages: list[dict] | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    stages = stages or [{"name": "main", "method": {"name": "ce"}, "epochs": 200}]
    (d / "config.yaml").write_text(yaml.safe_dump(_config(name, stages)))
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _is_png(p: Path) -> bool:
    data = p.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------- plots


def test_save_run_plots_writes_expected_pngs(tmp_path):
    metrics = _metrics({
        "test": _split(70.0, 90.0, 60.0, 10.0, per_attribute=True),
        "val": _split(68.0, 88.0, None, 12.0, confusion=False),
    })
    run = make_run(tmp_path, "run_a", metrics)
    before = plt.get_fignums()
    paths = save_run_plots(run, metrics)
    names = sorted(p.name for p in paths)
    assert names == sorted(["per_class_test.png", "confusion_test.png", "per_attribute_test.png",
                            "per_class_val.png", "shots.png"])
    for p in paths:
        assert p.parent == run / "plots"
        assert _is_png(p), p
    # nothing else left in the folder (no temp files), no pyplot figure opened
    assert sorted(p.name for p in (run / "plots").iterdir()) == names
    assert plt.get_fignums() == before


def test_save_run_plots_without_splits(tmp_path):
    assert save_run_plots(tmp_path, {"splits": {}}) == []


def test_plot_confusion_limits(tmp_path):
    with pytest.raises(ValueError, match="100"):
        plot_confusion([[1] * 101 for _ in range(101)], None, tmp_path / "c.png")
    with pytest.raises(ValueError, match="square"):
        plot_confusion([[1, 2, 3], [4, 5, 6]], None, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
    # 40 classes: no tick labels but still drawn; a class with no samples (zero row) is fine
    cm = [[0] * 40] + [[5 if i == j else 0 for j in range(40)] for i in range(1, 40)]
    assert _is_png(plot_confusion(cm, [f"c{i}" for i in range(40)], tmp_path / "c40.png"))


def test_individual_plots(tmp_path):
    p = plot_per_class([None, None], [10, 0], None, tmp_path / "empty.png", thresholds=None)
    assert _is_png(p)
    with pytest.raises(ValueError):
        plot_per_class([1.0], [1, 2], None, tmp_path / "bad.png")
    assert _is_png(plot_shot_bars({"a": {"top1": 50.0, "many": None}, "b": {}}, tmp_path / "s.png"))
    assert _is_png(plot_per_attribute({"1": 40.0, "0": 80.0}, ["head", "tail"], tmp_path / "a.png"))
    rows = [{"alpha": a, "top1": 50 + a, "many": 70 - a, "medium": 50.0, "few": None if a == 0 else 20 + a}
            for a in (1.0, 0.0, 0.5)]
    assert _is_png(plot_sweep(rows, "alpha", tmp_path / "sweep.png", title="alpha sweep"))
    with pytest.raises(ValueError):
        plot_sweep([{"top1": 1.0}], "alpha", tmp_path / "x.png")


def test_sweep_plot_leaves_a_shot_group_without_values_out_of_its_legend(tmp_path, monkeypatch):
    import longtail.evaluation.plots as plots

    legends, save = [], plots._save

    def save_and_keep_the_legend(fig, path):
        legends.append([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", save_and_keep_the_legend)
    rows = [{"tau": t, "top1": 60 + t, "many": 80 - t, "medium": 50.0, "few": None, "mean_class_acc": None}
            for t in (0.0, 1.0)]
    assert _is_png(plot_sweep(rows, "tau", tmp_path / "sweep.png", chosen=1.0))
    labels = legends[-1]
    assert len(labels) == 4 and labels[-1] == "chosen tau=1" and not any("few" in t or "per-class" in t for t in labels)
    rows[0]["few"] = 10.0  # one value is enough to draw the group
    plot_sweep(rows, "tau", tmp_path / "sweep.png")
    assert len(legends[-1]) == 4 and "few" in legends[-1]


def test_parse_thresholds():
    assert parse_thresholds("many > 100, few < 20 training images") == (20, 100)
    assert parse_thresholds("many >= 50, few <= 5 training images") == (5, 50)
    assert parse_thresholds("something else") is None
    assert parse_thresholds(None) is None


# --------------------------------------------------------------------------------------------- report


def _two_runs(tmp_path) -> tuple[Path, Path]:
    a = make_run(tmp_path, "ce_run", _metrics({
        "test": _split(70.04, 90.0, 60.25, None),
        "val": _split(66.66, 85.0, 55.0, 12.349),
    }))
    b = make_run(tmp_path, "decoupled_run", _metrics({"test": _split(72.5, 88.0, 65.0, 30.0)}), stages=[
        {"name": "rep", "method": {"name": "ce"}, "epochs": 180},
        {"name": "cls", "method": "crt", "epochs": 20},
    ])
    return a, b


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|")][2:]


def test_runs_table_all_splits(tmp_path):
    a, b = _two_runs(tmp_path)
    table = runs_table([a, b])
    assert "ce_run" in table and "decoupled_run" in table
    rows = _rows(table)
    assert len(rows) == 3
    assert rows[0] == ["ce_run", "cifar10_lt (IR 100)", "resnet32", "ce", "200", "test",
                       "70.0", "90.0", "60.2", "–", "55.5"]
    assert rows[1][5:] == ["val", "66.7", "85.0", "55.0", "12.3", "55.5"]
    assert rows[2][3:6] == ["ce -> crt", "180+20", "test"]
    assert rows[2][6:] == ["72.5", "88.0", "65.0", "30.0", "55.5"]
    assert "Shot groups: many > 100, few < 20 training images." in table
    assert "differ" not in table


def test_runs_table_split_filter(tmp_path):
    a, b = _two_runs(tmp_path)
    rows = _rows(runs_table([a, b], split="test"))
    assert [r[5] for r in rows] == ["test", "test"]
    table = runs_table([a, b], split="val")
    rows = _rows(table)
    assert [r[0] for r in rows] == ["ce_run", "decoupled_run"]
    assert rows[1][6:] == ["–"] * 5
    assert "decoupled_run has no split 'val'" in table


def test_runs_table_names_a_stage_started_from_another_run(tmp_path):
    run = make_run(tmp_path, "crt_on_ce", _metrics({"test": _split(72.5, 88.0, 65.0, 30.0)}), stages=[
        {"name": "features", "method": {"name": "ce"}, "epochs": 0,
         "init_from": "/runs/ce_10ep/checkpoints/final.pt"},
        {"name": "classifier", "method": {"name": "crt"}, "epochs": 10, "init_from": "features"},
    ])
    assert _rows(runs_table([run]))[0][3:5] == ["ce (from ce_10ep) -> crt", "0+10"]


def test_tables_name_glt_protocols(tmp_path):
    """A split scored under a GLT protocol is labelled with it in both tables."""
    m = _metrics({"test_cbl": {**_split(60.0, 70.0, 50.0, 40.0), "protocols": ["CLT"]},
                  "test_gbl": {**_split(50.0, 60.0, 40.0, 30.0), "protocols": ["GLT"]}})
    run = make_run(tmp_path, "glt_run", m)
    rows = _rows(runs_table([run]))
    assert [r[5] for r in rows] == ["test_cbl (CLT)", "test_gbl (GLT)"]
    assert [r[0] for r in _rows(results_table(m))] == ["test_cbl (CLT)", "test_gbl (GLT)"]


def test_runs_table_notes_differing_thresholds(tmp_path):
    a, _ = _two_runs(tmp_path)
    other = "many >= 100, few <= 20 training images"
    c = make_run(tmp_path, "oltr_run", _metrics({"test": _split(60.0, 80.0, 50.0, 20.0, thresholds=other)},
                                                thresholds=other))
    table = runs_table([a, c], split="test")
    assert "differ" in table
    assert THRESHOLDS in table and other in table


def test_results_table(tmp_path):
    metrics = _metrics({"test": _split(70.04, 90.0, None, 10.0), "val": _split(1.0, 2.0, 3.0, 4.0)})
    table = results_table(metrics, title="run_a, epoch 200")
    assert table.splitlines()[0] == "run_a, epoch 200"
    rows = _rows(table)
    assert rows[0] == ["test", "70.0", "70.0", "90.0", "–", "10.0", "55.5", "40"]
    assert rows[1][0] == "val"
    assert THRESHOLDS in table
    assert not results_table(metrics).startswith("\n")


def test_load_run(tmp_path):
    a, _ = _two_runs(tmp_path)
    run = load_run(a)
    assert run["name"] == "ce_run"
    assert run["config"]["model"]["backbone"] == "resnet32"
    assert set(run["metrics"]["splits"]) == {"test", "val"}

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(yaml.safe_dump(_config("x", [])))
    with pytest.raises(FileNotFoundError) as err:
        load_run(unfinished)
    msg = str(err.value)
    assert str(unfinished) in msg and "metrics.json" in msg and "longtail eval" in msg
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        runs_table([a, unfinished])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_run(tmp_path / "nope")
