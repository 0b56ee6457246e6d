"""eval.select=best_val: the val metric it picks on (eval.select_metric, auto on long-tailed val), eval_every's
default, and mean-class accuracy in the printed table."""

import json

import pytest
import torch

from longtail.config import EvalConfig
from longtail.engine import build, fit, train
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.evaluate import select_metric_of
from test_engine_cli import tiny_raw

# Per epoch (top1, mean_class_acc) on val: top-1 peaks at epoch 1 (the head class right), mean-class at epoch 2.
SCRIPT = [(80.0, 40.0), (70.0, 60.0), (60.0, 50.0)]


def _scripted_val(monkeypatch):
    real = fit.evaluate_split
    script = list(SCRIPT)

    def evaluate_split(method, loader, split, *a, **k):
        out = real(method, loader, split, *a, **k)
        if split == "val" and script:  # the three per-epoch evaluations; the final report is the real one
            out["top1"], out["mean_class_acc"] = script.pop(0)
        return out

    monkeypatch.setattr(fit, "evaluate_split", evaluate_split)


@pytest.mark.parametrize("metric, epoch", [("top1", 1), ("mean_class_acc", 2), ("auto", 2)])
def test_selection_on_mean_class_accuracy_picks_another_epoch_than_top1(metric, epoch, image_folder, tmp_path,
                                                                         monkeypatch):
    _scripted_val(monkeypatch)
    raw = tiny_raw(image_folder, epochs=3)
    raw["data"]["val_fraction"] = 0.2  # val counts follow train's 24 / 8 / 3: long-tailed, so auto = mean_class_acc
    raw["eval"].update(select="best_val", select_metric=metric)  # no eval_every: best_val makes it 1
    cfg = build.build_config(raw)
    assert cfg.stages[0].eval_every == 1
    run = train(cfg, out=tmp_path / metric, progress=False)
    m = json.loads((run / "metrics.json").read_text())
    chosen = "mean_class_acc" if metric == "auto" else metric
    assert m["select_metric"] == chosen
    score = SCRIPT[epoch - 1][0 if chosen == "top1" else 1]
    assert m["selected"] == f"best val {chosen} {score:.2f} at stage main epoch {epoch}"
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best"]["epoch"] == epoch
    final = load_checkpoint(run / "checkpoints" / "final.pt")["method"]
    assert all(torch.equal(final[k], best["method"][k]) for k in final)


def test_auto_select_metric_follows_the_val_split():
    cfg = EvalConfig()
    assert select_metric_of(cfg, torch.tensor([0] * 10 + [1] * 10 + [2] * 9), 3) == "top1"
    assert select_metric_of(cfg, torch.tensor([0] * 10 + [1] * 4), 3) == "mean_class_acc"
    # CIFAR-LT val_per_class: the head class has no val image left, the rest are balanced
    assert select_metric_of(cfg, torch.tensor([1] * 5 + [2] * 5), 3) == "top1"
    assert select_metric_of(EvalConfig(select_metric="few"), torch.tensor([0, 1]), 2) == "few"


def test_best_val_defaults_eval_every_and_keeps_a_set_one():
    assert build.build_config({"eval": {"select": "best_val"}}).stages[0].eval_every == 1
    assert build.build_config({"eval": {"select": "best_val"}}, ["eval_every=3"]).stages[0].eval_every == 3
    assert build.build_config({}).stages[0].eval_every == 0
