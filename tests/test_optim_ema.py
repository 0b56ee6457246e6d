"""AdamW, gradient clipping and the EMA of weights: each trains on both in-memory data paths, EMA is evaluated as
its own variant, saved in final.pt, and resumes exactly."""

import json

import pytest
import torch

from longtail.config import build_config
from longtail.engine import Interrupted, train
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.ema import WeightEMA
from longtail.errors import ConfigError
from test_engine_cli import assert_same_state, final_weights, tiny_raw

PATHS = {"fast_path": {}, "per_image": {"fast_path": False, "num_workers": 0}}
OPTIONS = ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.05", "optim.clip_grad_norm=1.0",
           "ema.decay=0.8"]


def _raw(root, path, epochs=2, **kw):
    raw = tiny_raw(root, epochs=epochs, **kw)
    raw["data"].update(PATHS[path])
    return raw


@pytest.mark.parametrize("path", sorted(PATHS))
def test_adamw_clipping_and_ema_train_on_both_data_paths(path, image_folder, tmp_path):
    run = train(build_config(_raw(image_folder, path), OPTIONS), out=tmp_path / path, progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["splits_ema"]["test"]["num_samples"] == 12 and "top1" in m["splits_ema"]["test"]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all("exp_avg_sq" in s for s in last["optimizer"]["state"].values())  # AdamW's state
    assert last["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    ema, weights = final["ema"], final["method"]
    assert set(ema) <= set(weights) and "model.head.fc.weight" in ema
    assert not torch.equal(ema["model.head.fc.weight"], weights["model.head.fc.weight"])
    plain = train(build_config(_raw(image_folder, path), OPTIONS[:-2]), out=tmp_path / f"{path}_plain",
                  progress=False)
    assert "splits_ema" not in json.loads((plain / "metrics.json").read_text())
    # the EMA only reads the weights; clipping at 1.0 changes them (the tiny net's gradient norms exceed it)
    with_ema = train(build_config(_raw(image_folder, path), OPTIONS[:-2] + ["ema.decay=0.8"]),
                     out=tmp_path / f"{path}_ema", progress=False)
    assert_same_state(final_weights(plain), final_weights(with_ema))
    assert not torch.equal(final_weights(plain)["model.head.fc.weight"], weights["model.head.fc.weight"])


def test_weight_ema_averages_floats_and_copies_counters():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(net, 0.75)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(4.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update()
    assert torch.allclose(ema.state["0.weight"], w0 + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    assert ema.state["1.num_batches_tracked"].item() == 7
    averaged = ema.averaged(net)
    assert torch.allclose(averaged[0].weight, w0 + 1.0) and not averaged.training and net[0].weight is not None


def test_resume_with_ema_and_adamw_is_exact(image_folder, tmp_path, interrupt_method):
    opts = OPTIONS
    ref = train(build_config(tiny_raw(image_folder, epochs=3), opts), out=tmp_path / "ref", progress=False)
    cfg = build_config(tiny_raw(image_folder, epochs=3, method="interrupt_test", at_step=6), opts)  # epoch 2
    with pytest.raises(Interrupted):
        train(cfg, out=tmp_path / "int", progress=False)
    assert load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["ema"] is not None
    resumed = train(out=tmp_path / "int", resume=True, progress=False)
    assert_same_state(final_weights(ref), final_weights(resumed))
    a = load_checkpoint(ref / "checkpoints" / "final.pt")["ema"]
    b = load_checkpoint(resumed / "checkpoints" / "final.pt")["ema"]
    assert_same_state(a, b)
    ma = json.loads((ref / "metrics.json").read_text())["splits_ema"]["test"]["per_class"]
    assert ma == json.loads((resumed / "metrics.json").read_text())["splits_ema"]["test"]["per_class"]


@pytest.mark.parametrize("override, message", [
    ("optim.name=adam", "optim.name must be sgd or adamw"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("ema.decay=1.0", r"ema.decay must be in \[0, 1\)"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm must be >= 0"),
])
def test_bad_optimiser_options_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, [override])


def test_cli_prints_the_ema_table(image_folder, tmp_path, capsys):
    import yaml

    from longtail.cli import main

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw(image_folder, epochs=1)))
    assert main(["train", str(cfg_path), "ema.decay=0.5", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "EMA of the weights" in printed and "mean_class" in printed and "metrics.csv" in printed


def test_clipping_set_on_every_stage_leaves_a_stage_without_epochs_alone(image_folder, tmp_path):
    """A recipe may set clip_grad_norm on a post-hoc stage (ncm: epochs 0, no optimiser): it clips nothing there."""
    raw = tiny_raw(image_folder, epochs=1)
    raw["stages"][0].update(name="features", optim={"lr": 0.05, "clip_grad_norm": 1.0})
    raw["stages"].append({"name": "classifier", "method": {"name": "ncm"}, "epochs": 0, "batch_size": 8,
                          "init_from": "features", "optim": {"clip_grad_norm": 1.0}})
    run = train(build_config(raw), out=tmp_path / "ncm", progress=False)
    assert "top1" in json.loads((run / "metrics.json").read_text())["splits"]["test"]
